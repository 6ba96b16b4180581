"""Plan, train, predict and evaluate a toy dataset through the nnDiffSeg_ tools (nnDiffSegPlans and the
nnDiffSegTrainer base class), and reach the same model with stock nnU-Net commands."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli import assert_refused, nnunet_folders, run_batch, run_tool
from PIL import Image
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 11
RUN_LENGTH = ["--num_epochs", "3", "--iters_per_epoch", "10"]


@pytest.fixture(scope="module")
def toy(module_tmp):
    root = module_tmp("toy_pipeline")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=10, num_test=3)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, "-np", 1, "-npfp", 1, env=env)
    train = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainer", "-device", "cpu",
                     *RUN_LENGTH, env=env)
    model = root / "nnUNet_results" / raw.name / "nnDiffSegTrainer__nnDiffSegPlans__2d"
    return {"root": root, "env": env, "raw": raw, "model": model, "train_log": train.stdout}


def load_labels(folder, case_names):
    return {c: np.array(Image.open(folder / f"{c}.png")) for c in case_names}


def test_plans_tile_the_latent_grid(toy):
    plans = json.loads((toy["root"] / "nnUNet_preprocessed" / toy["raw"].name / "nnDiffSegPlans.json").read_text())
    config = plans["configurations"]["2d"]
    assert all(s % 64 == 0 for s in config["patch_size"]), config["patch_size"]
    # the U-Net topology was rebuilt for the new patch: its total stride divides the patch
    strides = np.prod(np.array(config["architecture"]["arch_kwargs"]["strides"]), axis=0)
    assert all(p % s == 0 for p, s in zip(config["patch_size"], strides))
    assert config["data_identifier"] == "nnDiffSegPlans_2d"


def test_training_honours_run_length_and_validates(toy):
    fold = toy["model"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    record = json.loads((fold / "nndiffseg_run.json").read_text())
    assert record["run_length"] == {"num_epochs": 3, "num_iterations_per_epoch": 10,
                                    "num_val_iterations_per_epoch": 2}
    assert "Epoch 2" in toy["train_log"] and "Epoch 3" not in toy["train_log"]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    # a sanity check of nnU-Net's final validation, not a learning test: on these low-noise toy discs a per-pixel
    # colour rule scores higher (learning is tested against both trivial rules in test_guided_trainer and
    # test_latent_learning)
    assert summary["foreground_mean"]["Dice"] > 0.6


def test_continue_reuses_the_recorded_run_length(toy):
    """--c without --num_epochs must not resume towards nnU-Net's 1000 epochs."""
    result = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainer", "-device", "cpu", "--c",
                      env=toy["env"], timeout=300)
    assert "Epoch 3" not in result.stdout and "Training done" in result.stdout


@pytest.fixture(scope="module")
def predicted(toy):
    inp = toy["root"] / "predict_in"
    inp.mkdir()
    for f in (toy["raw"] / "imagesTs").iterdir():
        (inp / f.name).write_bytes(f.read_bytes())
    (inp / "broken_0000.png").write_bytes(b"not a png")
    out = toy["root"] / "predict_out"
    result = run_tool("nnDiffSeg_predict", "-i", inp, "-o", out, "-d", DATASET_ID, "-c", "2d",
                      "-tr", "nnDiffSegTrainer", "-f", 0, "-device", "cpu", "--disable_tta", "-nps", 1,
                      env=toy["env"], check=False)
    return {"in": inp, "out": out, "result": result}


def test_predict_reports_bad_case_and_predicts_the_rest(toy, predicted):
    result = predicted["result"]
    assert result.returncode == 1
    assert "broken" in result.stdout + result.stderr
    cases = sorted(f.name[:-9] for f in (toy["raw"] / "imagesTs").iterdir())
    # beside the label maps, what nnU-Net's predictor writes too (nnUNetv2_ensemble and postprocessing read them)
    assert sorted(f.name for f in predicted["out"].iterdir()) == sorted(
        [f"{c}.png" for c in cases] + ["dataset.json", "nndiffseg_predict_args.json", "plans.json"])
    model_json = json.loads((toy["model"] / "dataset.json").read_text())
    assert json.loads((predicted["out"] / "dataset.json").read_text()) == model_json
    assert json.loads((predicted["out"] / "plans.json").read_text())["plans_name"] == "nnDiffSegPlans"
    summary = run_tool("nnDiffSeg_evaluate", "-ref", toy["raw"] / "labelsTs", "-pred", predicted["out"],
                       "-o", toy["root"] / "test_summary.json", env=toy["env"])
    assert "Dice" in summary.stdout
    assert json.loads((toy["root"] / "test_summary.json").read_text())["mean"]["dice"] > 0.6


def test_continue_prediction_only_predicts_missing_cases(toy, predicted):
    """A missing label map is predicted, and so is an empty one (issue 28 item 3: it counted as done)."""
    out = predicted["out"]
    files = sorted(out.glob("*.png"))  # the label maps (the run record beside them is written again)
    kept_mtime = files[0].stat().st_mtime_ns
    files[-1].unlink()
    files[1].write_bytes(b"")
    (predicted["in"] / "broken_0000.png").unlink()
    result = run_tool("nnDiffSeg_predict", "-i", predicted["in"], "-o", out, "-d", DATASET_ID, "-c", "2d",
                      "-tr", "nnDiffSegTrainer", "-device", "cpu", "--disable_tta", "-nps", 0,
                      "--continue_prediction", env=toy["env"])
    assert "1 case(s) already predicted" in result.stdout and f"predicted again: {files[1].stem}" in result.stdout
    assert files[-1].is_file() and files[0].stat().st_mtime_ns == kept_mtime
    assert np.array(Image.open(files[1])).shape == np.array(Image.open(files[0])).shape


def test_stock_nnunet_finds_the_same_trainer_class(toy):
    code = ("import nndiffseg.trainers as t;"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find;"
            "print(find('nnDiffSegTrainer') is t.nnDiffSegTrainer)")
    from pathlib import Path

    from nndiffseg.ext_trainer import EXT_TRAINER_DIR
    same = subprocess.run([sys.executable, "-c", code], env={**os.environ, "nnUNet_extTrainer": EXT_TRAINER_DIR},
                          capture_output=True, text=True, check=True)
    assert same.stdout.strip().splitlines()[-1] == "True"
    # pointing nnU-Net at the trainers package itself imports a second copy: the reason the shim folder exists
    trainers_dir = str(Path(__import__("nndiffseg.trainers").trainers.__file__).parent)
    copy = subprocess.run([sys.executable, "-c", code], env={**os.environ, "nnUNet_extTrainer": trainers_dir},
                          capture_output=True, text=True, check=True)
    assert copy.stdout.strip().splitlines()[-1] == "False"


def test_stock_nnunetv2_predict_runs_our_trainer(toy, predicted):
    from nndiffseg.ext_trainer import EXT_TRAINER_DIR
    out = toy["root"] / "stock_out"
    run_tool("nnUNetv2_predict", "-i", toy["raw"] / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "2d",
             "-tr", "nnDiffSegTrainer", "-p", "nnDiffSegPlans", "-f", 0, "-device", "cpu", "--disable_tta",
             "-npp", 1, "-nps", 1, env={**toy["env"], "nnUNet_extTrainer": EXT_TRAINER_DIR})
    cases = [f.name[:-4] for f in sorted(out.glob("*.png"))]
    assert len(cases) == 3
    ours, stock = load_labels(predicted["out"], cases), load_labels(out, cases)
    for c in cases:
        np.testing.assert_array_equal(ours[c], stock[c])


REFUSALS = {
    "train_unknown_trainer": ("nnDiffSeg_train", ["-tr", "NoSuchTrainer"], "trainer 'NoSuchTrainer' not found"),
    "train_unknown_plans": ("nnDiffSeg_train", ["-p", "NoSuchPlans"], "NoSuchPlans.json not found"),
    "predict_missing_fold": ("nnDiffSeg_predict", ["-f", 3], "fold(s) 3 have no checkpoint_final.pth"),
    "predict_steps": ("nnDiffSeg_predict", ["-f", 0, "--steps", 10], "nnDiffSegTrainer takes no --steps"),
    "predict_uncertainty": ("nnDiffSeg_predict", ["-f", 0, "--save_uncertainty"],
                            "nnDiffSegTrainer draws no samples: its folds are the samples, and fold 0 alone has no "
                            "uncertainty to save; predict with several folds"),
}


@pytest.fixture(scope="module")
def refused(toy):
    """The refusals, run in one process (tests/cli.py run_batch); training refusals on fold 1, which has no
    run, predictions into a folder of their own."""
    commands = []
    for name, (tool, args, _) in REFUSALS.items():
        if tool == "nnDiffSeg_train":
            commands.append((tool, [DATASET_ID, "2d", 1, "-device", "cpu", *args]))
        else:
            commands.append((tool, ["-i", toy["raw"] / "imagesTs", "-o", toy["root"] / f"never_{name}", "-d",
                                    DATASET_ID, "-c", "2d", "-tr", "nnDiffSegTrainer", "-device", "cpu", *args]))
    return dict(zip(REFUSALS, run_batch(toy["root"], "refusals", commands, toy["env"])))


@pytest.mark.parametrize("name", list(REFUSALS))
def test_bad_arguments_are_refused_and_nothing_is_written(toy, refused, name):
    assert_refused(refused[name], [REFUSALS[name][2]])
    assert not (toy["model"] / "fold_1").exists()
    assert not (toy["root"] / f"never_{name}").exists()
