"""Multi-process training on torch.distributed's gloo backend (CPU): DDP averages the gradients of calls through
its forward, so two ranks on different halves of a batch end with the same weights as one process on the
whole batch; and nnDiffSeg_train -num_gpus 2 -device cpu runs nnU-Net's own DDP path."""
import json
import os
import socket

import ddp_worker
import pytest
import torch
import torch.multiprocessing as mp
from cli import PLAN_QUICKLY, nnunet_folders, run_tool
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 61


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["guided", "latent"])
def test_two_ranks_end_equal_to_each_other_and_to_one_process_on_the_whole_batch(tmp_path, monkeypatch, kind):
    """Frozen parts stay out of DDP's reducer (the latent head's mask autoencoder here; the guided prior in the
    nnDiffSeg_train test below); the latent scale is computed from both ranks' masks."""
    monkeypatch.setenv("MASTER_PORT", _free_port())
    mp.spawn(ddp_worker.run_rank, args=(2, kind, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    single = ddp_worker.run_single(kind)
    untouched = ddp_worker.build_head(kind).state_dict()
    changed = 0
    for key, value in single.items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
        changed += not torch.equal(value, untouched[key])
    assert changed > 10  # the steps did train
    if kind == "latent":
        assert ranks[0]["mask_latent_scale"] == ranks[1]["mask_latent_scale"] == single["mask_latent_scale"]
        for key, value in untouched.items():
            if key.startswith("mask_autoencoder."):
                assert torch.equal(ranks[0][key], value), key


def test_nndiffseg_train_runs_ddp_on_gloo_with_two_cpu_processes_and_a_frozen_prior(tmp_path):
    """nnU-Net's DDP path through nnDiffSeg_train, with --prior CHECKPOINT --freeze_prior: the prior starts
    from an nnUNetTrainer fold of the same plans and stays unchanged; it is frozen before the network is
    wrapped (frozen afterwards, DDP waits for gradients that never come); the ranks end identical (checked and
    logged at the end of training). (--freeze_prior without --prior is refused: test_guided_trainer.)"""
    import torch
    env = nnunet_folders(tmp_path)
    # 11 cases: fold 0 validates 3, so the two ranks predict different numbers of cases in the final
    # validation (a per-forward DDP collective deadlocked there)
    raw = write_toy_dataset(tmp_path / "nnUNet_raw", DATASET_ID, num_train=11, num_test=1, num_classes=2)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, *PLAN_QUICKLY, env=env)
    short = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 2]
    run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnUNetTrainer", *short, env=env)
    results = tmp_path / "nnUNet_results" / raw.name
    prior = results / "nnUNetTrainer__nnDiffSegPlans__2d" / "fold_0" / "checkpoint_final.pth"
    result = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerGuided", *short,
                      "-num_gpus", 2, "--clip_model", "random", "--prior", prior, "--freeze_prior",
                      env={**env, "MASTER_PORT": _free_port(), "nnUNet_def_n_proc": "1"})
    assert "DDP: parameters and buffers identical on all 2 ranks" in result.stdout
    assert f"prior initialised from {prior} (nnUNetTrainer), frozen" in result.stdout
    fold = results / "nnDiffSegTrainerGuided__nnDiffSegPlans__2d" / "fold_0"
    assert len(json.loads((fold / "validation" / "summary.json").read_text())["metric_per_case"]) == 3
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    for key, value in torch.load(prior, map_location="cpu", weights_only=False)["network_weights"].items():
        assert torch.equal(weights["prior." + key], value), key
    assert os.environ.get("WORLD_SIZE") is None  # nothing leaked into the test process
