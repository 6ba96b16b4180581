"""The latent trainers inside nnU-Net on a 3-class toy dataset: one command runs the mask autoencoder stage and
the single-step trainer, either stage resumes with --c, prediction goes through nnDiffSeg_predict and stock
nnUNetv2_predict (short runs: plumbing; tests/test_latent_learning.py checks what it learns)."""
import json
import os

import numpy as np
import pytest
from cli import assert_refused, planned_toy, run_batch, run_tool
from PIL import Image
from resume import assert_same_weights, crash_after_first_epoch

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 31
SHORT = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 4]
# seeded, so that a run interrupted in either stage and resumed must end with these weights; the mask
# autoencoder stage runs at most 0.5 x 4 = 2 epochs
SEED, EPOCHS = 7, 4
SEEDED = ["-device", "cpu", "--num_epochs", EPOCHS, "--iters_per_epoch", 2, "--seed", SEED]
MASK_VAE, LATENT = "nnDiffSegTrainerMaskVAE__nnDiffSegPlans__2d", "nnDiffSegTrainerLatent__nnDiffSegPlans__2d"


@pytest.fixture(scope="module")
def latent(module_tmp):
    root = module_tmp("latent")
    env, raw = planned_toy(root, DATASET_ID, num_train=10, num_test=2, num_classes=2)
    seg = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", *SEEDED, env=env)
    return {"root": root, "env": env, "raw": raw, "seg_log": seg.stdout,
            "results": root / "nnUNet_results" / raw.name}


def _final(results, model, fold=0):
    import torch
    return torch.load(results / model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def test_one_command_runs_the_mask_autoencoder_stage_first(latent):
    assert f"running the mask autoencoder stage first (nnDiffSegTrainerMaskVAE, {EPOCHS} epochs x 2 iterations)" in \
        latent["seg_log"]
    summary = json.loads((latent["results"] / MASK_VAE / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["reconstruction_dice"]) == {"1", "2"}  # per foreground class
    assert f"mask autoencoder loaded from {latent['results'] / MASK_VAE / 'fold_0' / 'checkpoint_final.pth'}" in \
        latent["seg_log"]
    assert (latent["results"] / LATENT / "fold_0" / "checkpoint_final.pth").is_file()


_STAGE_WITH_A_TARGET_OF_ZERO = """
import sys
import nndiffseg.trainers.latent as latent
from nndiffseg.run.train import train
latent.RECONSTRUCTION_TARGET = 0.0  # any reconstruction reaches it: the stage must stop after its first epoch
train(sys.argv[1], "2d", 2, trainer_name="nnDiffSegTrainerMaskVAE", device="cpu", num_epochs=3, iters_per_epoch=2)
"""


def test_the_mask_autoencoder_stage_stops_once_the_target_is_reached(latent):
    import subprocess
    import sys

    import torch
    result = subprocess.run([sys.executable, "-c", _STAGE_WITH_A_TARGET_OF_ZERO, str(DATASET_ID)],
                            env={**os.environ, **latent["env"]}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for every class: stopping after 1 of 3 epochs" in result.stdout
    fold = latent["results"] / MASK_VAE / "fold_2"
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1
    assert (fold / "validation" / "summary.json").is_file()


def test_a_run_interrupted_in_the_mask_autoencoder_stage_resumes_with_c(latent, tmp_path):
    """Killed after the stage's first epoch, resumed with a bare --c: the stage continues from its checkpoint, then
    the single-step trainer runs, and both end with the uninterrupted run's weights."""
    env = {**latent["env"], "nnUNet_results": str(tmp_path / "nnUNet_results")}
    results = tmp_path / "nnUNet_results" / latent["raw"].name
    crash_after_first_epoch("nnDiffSegTrainerLatent", DATASET_ID, 0, {"seed": SEED}, env, num_epochs=EPOCHS,
                            crash_in="nnDiffSegTrainerMaskVAE")
    assert (results / MASK_VAE / "fold_0" / "checkpoint_latest.pth").is_file()
    assert not (results / MASK_VAE / "fold_0" / "checkpoint_final.pth").exists()
    resumed = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", "-device", "cpu",
                       "--c", env=env)
    assert "continuing the mask autoencoder stage first" in resumed.stdout
    for model in (MASK_VAE, LATENT):
        assert_same_weights(_final(results, model), _final(latent["results"], model))


def test_a_run_interrupted_in_the_single_step_stage_resumes_with_c(latent, tmp_path):
    """A seeded run given the fixture's mask autoencoder with --mask_vae (no stage then), killed after epoch 0 and
    resumed with a bare --c (the seed and --mask_vae come from the run's record), ends with the weights of the
    uninterrupted one-command run."""
    import torch
    mask_vae = latent["results"] / MASK_VAE / "fold_0" / "checkpoint_final.pth"
    folder = tmp_path / "nnUNet_results"
    env = {**latent["env"], "nnUNet_results": str(folder)}
    crash_after_first_epoch("nnDiffSegTrainerLatent", DATASET_ID, 0, {"mask_vae": str(mask_vae), "seed": SEED}, env,
                            num_epochs=EPOCHS)
    results = folder / latent["raw"].name
    assert not (results / MASK_VAE).exists()  # --mask_vae given: no stage of its own
    interrupted = torch.load(results / LATENT / "fold_0" / "checkpoint_latest.pth", map_location="cpu",
                             weights_only=False)
    resumed = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", "-device", "cpu",
                       "--c", env=env)
    assert "mask latents scaled" not in resumed.stdout  # nothing re-initialised: all of it came from the checkpoint
    final = _final(results, LATENT)
    assert final["current_epoch"] == EPOCHS and interrupted["current_epoch"] == 1
    assert not torch.equal(final["network_weights"]["denoiser.conv_in.weight"],
                           interrupted["network_weights"]["denoiser.conv_in.weight"])  # epochs 1-3 did train
    assert_same_weights(final, _final(latent["results"], LATENT))


def test_single_step_model_predicts_through_our_and_stock_tools(latent):
    from nndiffseg.ext_trainer import EXT_TRAINER_DIR
    ours, stock = latent["root"] / "ours", latent["root"] / "stock"
    common = ["-i", latent["raw"] / "imagesTs", "-d", DATASET_ID, "-c", "2d", "-tr", "nnDiffSegTrainerLatent",
              "-f", 0, "-device", "cpu", "--disable_tta"]
    run_tool("nnDiffSeg_predict", "-o", ours, *common, "-nps", 0, env=latent["env"])
    run_tool("nnUNetv2_predict", "-o", stock, *common, "-p", "nnDiffSegPlans", "-npp", 1, "-nps", 1,
             env={**latent["env"], "nnUNet_extTrainer": EXT_TRAINER_DIR})
    cases = sorted(f.name for f in ours.glob("*.png"))
    assert len(cases) == 2
    for c in cases:
        a, b = np.array(Image.open(ours / c)), np.array(Image.open(stock / c))
        assert set(np.unique(a)) <= {0, 1, 2}
        np.testing.assert_array_equal(a, b)  # one step from a fixed noise: deterministic


@pytest.fixture(scope="module")
def refused(latent, module_tmp):
    """Refusals, run in one process (tests/cli.py run_batch)."""
    missing = module_tmp("refusals") / "no_such_folder"
    predict = ["-i", latent["raw"] / "imagesTs", "-o", latent["root"] / "no", "-d", DATASET_ID, "-c", "2d", "-tr",
               "nnDiffSegTrainerLatent", "-f", 0, "-device", "cpu"]
    commands = [("nnDiffSeg_train", [DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerMaskVAE_sd", *SHORT, "--sd_weights",
                                     missing]),
                ("nnDiffSeg_train", [DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainer", "--sd_weights", "random", *SHORT]),
                ("nnDiffSeg_predict", [*predict, "--steps", 0])]
    return run_batch(latent["root"], "refusals", commands, latent["env"])


def test_unreachable_stable_diffusion_weights_stop_with_a_clear_error(refused):
    assert_refused(refused[0], ["cannot load Stable Diffusion's autoencoder", "--sd_weights random"])


def test_method_options_are_refused_by_trainers_without_them(refused):
    assert_refused(refused[1], ["nnDiffSegTrainer takes no --sd_weights"])


def test_zero_denoising_steps_are_refused_before_anything_is_written(latent, refused):
    assert_refused(refused[2], ["sampling steps must be an integer from 1 to 1000, got 0"])
    assert not (latent["root"] / "no").exists()


def test_more_denoising_steps_run_ddim_through_nndiffseg_predict(latent):
    out = latent["root"] / "ddim"
    result = run_tool("nnDiffSeg_predict", "-i", latent["raw"] / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "2d",
                      "-tr", "nnDiffSegTrainerLatent", "-f", 0, "-device", "cpu", "--disable_tta", "-nps", 0,
                      "--steps", 3, env=latent["env"])
    assert "Predicted 2 case(s)" in result.stdout
    for f in out.glob("*.png"):
        assert set(np.unique(np.array(Image.open(f)))) <= {0, 1, 2}
