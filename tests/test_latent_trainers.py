"""The latent trainers inside nnU-Net: mask autoencoder stage, single-step trainer, prediction through
nnDiffSeg_predict and stock nnUNetv2_predict, on a 3-class toy dataset (short runs: plumbing, not quality)."""
import json

import numpy as np
import pytest
from PIL import Image

from cli import nnunet_folders, run_tool
from resume import assert_same_weights, crash_after_first_epoch, uninterrupted_results
from toy_data import write_toy_dataset

DATASET_ID = 31
SHORT = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 4]


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=10, num_test=2, num_classes=2)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, "-np", 1, "-npfp", 1, env=env)
    vae = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerMaskVAE", *SHORT, env=env)
    seg = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", *SHORT, env=env)
    return {"root": root, "env": env, "raw": raw, "vae_log": vae.stdout, "seg_log": seg.stdout}


def test_mask_autoencoder_stage_reports_reconstruction_dice_per_class(latent):
    summary = json.loads((latent["root"] / "nnUNet_results" / latent["raw"].name /
                          "nnDiffSegTrainerMaskVAE__nnDiffSegPlans__2d" / "fold_0" / "validation" /
                          "summary.json").read_text())
    assert set(summary["reconstruction_dice"]) == {"1", "2"}


def test_latent_trainer_takes_the_same_folds_mask_autoencoder(latent):
    assert "mask autoencoder loaded from" in latent["seg_log"]
    assert "nnDiffSegTrainerMaskVAE__nnDiffSegPlans__2d/fold_0/checkpoint_final.pth" in latent["seg_log"]


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


def test_unreachable_stable_diffusion_weights_stop_with_a_clear_error(latent, tmp_path):
    result = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerMaskVAE_sd", *SHORT,
                      "--sd_weights", tmp_path / "no_such_folder", env=latent["env"], check=False)
    assert result.returncode == 1
    assert "cannot load Stable Diffusion's autoencoder" in result.stderr and "--sd_weights random" in result.stderr


def test_method_options_are_refused_by_trainers_without_them(latent):
    result = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainer", "--sd_weights", "random",
                      *SHORT, env=latent["env"], check=False)
    assert result.returncode == 1 and "nnDiffSegTrainer takes no --sd_weights" in result.stderr


def test_interrupted_run_resumed_with_c_ends_with_the_weights_of_an_uninterrupted_one(latent):
    """A seeded run killed after epoch 0 and resumed with --c (no other option: the seed and --mask_vae come from
    the run's record) ends with the same weights as the same seeded run never interrupted."""
    import torch
    results = latent["root"] / "nnUNet_results" / latent["raw"].name
    mask_vae = results / "nnDiffSegTrainerMaskVAE__nnDiffSegPlans__2d" / "fold_0" / "checkpoint_final.pth"
    options = {"mask_vae": str(mask_vae), "seed": 7}
    fold = results / "nnDiffSegTrainerLatent__nnDiffSegPlans__2d" / "fold_1"
    crash_after_first_epoch("nnDiffSegTrainerLatent", DATASET_ID, 1, options, latent["env"])
    assert not (fold / "checkpoint_final.pth").exists()
    interrupted = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    resumed = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerLatent", "-device", "cpu",
                       "--c", env=latent["env"])
    assert "mask latents scaled" not in resumed.stdout  # nothing re-initialised: all of it came from the checkpoint
    reference_env = uninterrupted_results(latent["root"], latent["env"])
    run_tool("nnDiffSeg_train", DATASET_ID, "2d", 1, "-tr", "nnDiffSegTrainerLatent", "-device", "cpu",
             "--num_epochs", 2, "--iters_per_epoch", 2, "--mask_vae", mask_vae, "--seed", 7, env=reference_env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    reference = torch.load(latent["root"] / "nnUNet_results_uninterrupted" / latent["raw"].name /
                           "nnDiffSegTrainerLatent__nnDiffSegPlans__2d" / "fold_1" / "checkpoint_final.pth",
                           map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and interrupted["current_epoch"] == 1
    assert not torch.equal(final["network_weights"]["denoiser.conv_in.weight"],
                           interrupted["network_weights"]["denoiser.conv_in.weight"])  # epoch 1 did train
    assert_same_weights(final, reference)


def test_more_denoising_steps_run_ddim_through_nndiffseg_predict(latent):
    out = latent["root"] / "ddim"
    result = run_tool("nnDiffSeg_predict", "-i", latent["raw"] / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "2d",
                      "-tr", "nnDiffSegTrainerLatent", "-f", 0, "-device", "cpu", "--disable_tta", "-nps", 0,
                      "--steps", 3, env=latent["env"])
    assert "Predicted 2 case(s)" in result.stdout
    for f in out.glob("*.png"):
        assert set(np.unique(np.array(Image.open(f)))) <= {0, 1, 2}
    refused = run_tool("nnDiffSeg_predict", "-i", latent["raw"] / "imagesTs", "-o", latent["root"] / "no", "-d",
                       DATASET_ID, "-c", "2d", "-tr", "nnDiffSegTrainerLatent", "-f", 0, "-device", "cpu",
                       "--steps", 0, env=latent["env"], check=False)
    assert refused.returncode == 1 and "sampling steps must be an integer from 1 to 1000, got 0" in refused.stderr
    assert not (latent["root"] / "no").exists()
