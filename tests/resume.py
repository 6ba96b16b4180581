"""An interrupted training run: nnDiffSeg_train's code path, crashed right after the checkpoint of epoch 0."""
import json
import os
import signal
import subprocess
import sys
import tempfile

_CRASH_AFTER_FIRST_EPOCH = """
import json, os, sys
import nndiffseg.trainers
from nndiffseg.run.train import train
trainer_name, dataset, fold, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
num_epochs, crash_in = int(sys.argv[5]), sys.argv[6]
cls = getattr(nndiffseg.trainers, crash_in)
end_epoch = cls.on_epoch_end
def on_epoch_end(self):
    end_epoch(self)
    self.current_epoch -= 1  # nnU-Net saves current_epoch + 1, as its own periodic checkpoint does
    self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
    os._exit(3)
cls.on_epoch_end = on_epoch_end
train(dataset, "2d", fold, trainer_name=trainer_name, device="cpu", num_epochs=num_epochs, iters_per_epoch=2,
      trainer_options=options)
"""


def crash_after_first_epoch(trainer: str, dataset_id: int, fold: int, options: dict, env: dict, num_epochs: int = 2,
                            crash_in: str = "") -> None:
    """Train ``num_epochs`` x 2 iterations; the process dies (exit 3) once epoch 0's checkpoint_latest is written
    (of the trainer class ``crash_in``, default ``trainer``: another class for a stage that ``trainer`` runs).
    Its data-augmentation workers outlive it, as after a real crash: they are killed with its process group
    (and the output goes to a file, as open pipes held by them would block reading until they die)."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-c", _CRASH_AFTER_FIRST_EPOCH, trainer, str(dataset_id),
                                    str(fold), json.dumps(options), str(num_epochs), crash_in or trainer],
                                   env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        returncode = process.wait(timeout=600)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.seek(0)
        assert returncode == 3, log.read()[-3000:]


def uninterrupted_results(root, env: dict) -> dict:
    """The env for a second nnUNet_results folder beside ``root``'s: the same fold trained there without the
    crash is the reference a resumed run must reproduce."""
    from pathlib import Path
    folder = Path(root) / "nnUNet_results_uninterrupted"
    folder.mkdir(exist_ok=True)
    return {**env, "nnUNet_results": str(folder)}


def assert_same_weights(resumed: dict, uninterrupted: dict) -> None:
    """Every tensor of two checkpoints' network weights is equal (both runs seeded, on the CPU)."""
    import torch
    a, b = resumed["network_weights"], uninterrupted["network_weights"]
    assert set(a) == set(b)
    differ = [k for k, v in a.items() if isinstance(v, torch.Tensor) and not torch.allclose(v, b[k], rtol=0, atol=1e-6)]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
