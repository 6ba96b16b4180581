"""The latent trainers inside nnU-Net: mask autoencoder stage, single-step trainer, prediction through
nnDiffSeg_predict and stock nnUNetv2_predict, on a 3-class toy dataset (short runs: plumbing, not quality)."""
import json

import numpy as np
import pytest
from PIL import Image

from cli import run_tool
from toy_data import write_toy_dataset

DATASET_ID = 31
SHORT = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 4]


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    env = {"nnUNet_n_proc_DA": "1"}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        env[name] = str(root / name)
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
