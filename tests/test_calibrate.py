"""nnDiffSeg_calibrate: a temperature fitted on a model's folds' validation probabilities, and its refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nndiffseg.evaluation.calibrate import CALIBRATION_FILE, calibrate_model, ece_rose, read_temperature

DATASET = "Dataset997_Calibration"
MODEL = "nnUNetTrainer__nnDiffSegPlans__2d"
TRUE_TEMPERATURE = 2.0


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


@pytest.fixture
def model(tmp_path):
    """A model folder as nnDiffSeg_train --npz leaves it (2 folds, 3 validation cases each): each validation case's
    probabilities are softmax(z) while its reference was drawn from softmax(z / 2), an over-confident model."""
    results, preprocessed = tmp_path / "results", tmp_path / "preprocessed"
    folder, gt = results / DATASET / MODEL, preprocessed / DATASET / "gt_segmentations"
    gt.mkdir(parents=True)
    (folder).mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}, "file_ending": ".png",
                                                     "channel_names": {"0": "R"}, "numTraining": 6}))
    (folder / "plans.json").write_text(json.dumps({
        "dataset_name": DATASET, "plans_name": "nnDiffSegPlans", "image_reader_writer": "NaturalImage2DIO",
        "label_manager": "LabelManager", "configurations": {}}))
    rng = np.random.default_rng(0)
    for fold in (0, 1):
        validation = folder / f"fold_{fold}" / "validation"
        validation.mkdir(parents=True)
        (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
        for case in range(3):
            z = rng.normal(0, 4, (2, 1, 96, 96))
            labels = (rng.random(z.shape[1:]) < _softmax(z / TRUE_TEMPERATURE)[1]).astype(np.uint8)
            name = f"case{fold}{case}"
            Image.fromarray(labels[0]).save(gt / f"{name}.png")
            np.savez_compressed(validation / f"{name}.npz", probabilities=_softmax(z).astype(np.float32))
    return {"folder": folder, "gt": gt, "env": {**os.environ, "nnUNet_results": str(results),
                                                 "nnUNet_preprocessed": str(preprocessed),
                                                 "nnUNet_raw": str(tmp_path / "raw")}}


def _calibrate(model, *args):
    return subprocess.run([sys.executable, "-m", "nndiffseg.evaluation.calibrate", "997", "-c", "2d", *args],
                          capture_output=True, text=True, env=model["env"])


@pytest.mark.slow  # runs the tool in a process that loads nnU-Net
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(model):
    result = _calibrate(model)
    assert result.returncode == 0, result.stderr
    written = json.loads((model["folder"] / CALIBRATION_FILE).read_text())
    assert abs(written["temperature"] / TRUE_TEMPERATURE - 1) <= 0.05, written["temperature"]
    assert read_temperature(model["folder"]) == written["temperature"]
    assert set(written["temperature_per_fold"]) == {"0", "1"}
    assert written["after"]["1"]["ece"] < written["before"]["1"]["ece"]
    assert written["after"]["1"]["brier"] < written["before"]["1"]["brier"]
    assert f"temperature {written['temperature']:.3f}" in result.stdout and "ECE" in result.stdout
    assert "note: T raised" not in result.stdout  # it fell


@pytest.mark.slow  # runs the tool in a process that loads nnU-Net
def test_a_fold_without_validation_probabilities_is_refused_with_the_command_that_makes_them(model):
    for npz in (model["folder"] / "fold_1" / "validation").glob("*.npz"):
        npz.unlink()
    result = _calibrate(model)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{model['folder'] / 'fold_1' / 'validation'} holds no probabilities (.npz)" in result.stderr
    assert "nnDiffSeg_train 997 2d 1 -tr nnUNetTrainer -p nnDiffSegPlans --val --npz" in result.stderr
    assert not (model["folder"] / CALIBRATION_FILE).exists()


@pytest.mark.slow  # runs the tool in a process that loads nnU-Net
def test_a_missing_reference_or_model_is_named_and_nothing_is_written(model):
    (model["gt"] / "case01.png").unlink()
    result = _calibrate(model)
    assert result.returncode == 1 and f"no reference {model['gt'] / 'case01.png'}" in result.stderr
    assert not (model["folder"] / CALIBRATION_FILE).exists()
    result = _calibrate(model, "-tr", "nnDiffSegTrainerGuided")
    assert result.returncode == 1 and "no trained model at" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # runs the tool in a process that loads nnU-Net
def test_predict_calibrate_refuses_a_fold_without_validation_probabilities_before_writing_anything(model, tmp_path):
    """nnDiffSeg_predict --calibrate fits the temperature before anything is predicted: a fold without --npz
    validation outputs stops it with calibrate's message, no prediction folder and no calibration.json."""
    for npz in (model["folder"] / "fold_0" / "validation").glob("*.npz"):
        npz.unlink()
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a_0000.png")
    result = subprocess.run([sys.executable, "-m", "nndiffseg.inference.predict", "-i", str(images), "-o", str(out),
                             "-d", "997", "-c", "2d", "-device", "cpu", "--calibrate"],
                            capture_output=True, text=True, env=model["env"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{model['folder'] / 'fold_0' / 'validation'} holds no probabilities (.npz)" in result.stderr
    assert "nnDiffSeg_train 997 2d 0 -tr nnUNetTrainer -p nnDiffSegPlans --val --npz" in result.stderr
    assert not out.exists() and not (model["folder"] / CALIBRATION_FILE).exists()


def test_calibrate_model_refuses_a_region_model(model):
    dataset_json = json.loads((model["folder"] / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    dataset_json["regions_class_order"] = [1, 2]
    (model["folder"] / "dataset.json").write_text(json.dumps(dataset_json))
    from nndiffseg.errors import NnDiffSegError
    with pytest.raises(NnDiffSegError, match="predicts regions"):
        calibrate_model(model["folder"], model["gt"], ["0"], lambda fold: "")


def test_a_temperature_that_raises_ece_is_named_with_what_to_do():
    """The likelihood's T can raise ECE (the guided add-on on ISIC, docs/benchmarks.md): the report says so."""
    result = {"before": {"1": {"ece": 0.020}, "2": {"ece": 0.05}}, "after": {"1": {"ece": 0.028}, "2": {"ece": 0.03}}}
    assert "class(es) 1 on the folds' validation cases" in ece_rose(result) and "--no_calibration" in ece_rose(result)
    result["after"]["1"]["ece"] = 0.010
    assert ece_rose(result) is None
