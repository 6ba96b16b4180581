"""``nnDiffSeg_calibrate``: a temperature for a trained model, fitted on its folds' validation probabilities.

Each fold's final validation keeps its probabilities with ``--npz`` (``fold_K/validation/CASE.npz``); the
references are nnU-Net's ``gt_segmentations``. One temperature is fitted on the pixels of every fold's validation
cases pooled (``nndiffseg.evaluation.temperature``): prediction ensembles the folds, so a single temperature is what
it can apply, and each fold's own fit is reported beside it to show how much they differ. The result, with ECE and
Brier before and after on the same pixels, is ``calibration.json`` in the model folder; ``nnDiffSeg_predict``
applies it to the probabilities it exports (the label maps do not change: T > 0 keeps the argmax), unless told
``--no_calibration``.
"""
import argparse
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.evaluation.temperature import fit_temperature, pool_pixels, scale_probabilities
from nndiffseg.evaluation.uncertainty_metrics import CalibrationCounts
from nndiffseg.files import write_json
from nndiffseg.inference.prediction_folder import load_array

CALIBRATION_FILE = "calibration.json"


def read_temperature(model_folder: Path) -> Optional[float]:
    """The model's fitted temperature, None when it was not calibrated."""
    file = Path(model_folder) / CALIBRATION_FILE
    return float(load_json(str(file))["temperature"]) if file.is_file() else None


def _fold_cases(model_folder: Path, fold: str, train_command: Callable[[str], str]) -> list[Path]:
    validation = model_folder / f"fold_{fold}" / "validation"
    files = sorted(validation.glob("*.npz"))
    if not files:
        raise NnDiffSegError(f"{validation} holds no probabilities (.npz): make them with {train_command(fold)} "
                             f"--val --npz, then calibrate again")
    return files


def _counts(probabilities: list[np.ndarray], labels: list[np.ndarray], num_classes: int) -> dict[str, dict]:
    per_class = {}
    for label in range(1, num_classes):
        counts = CalibrationCounts()
        for p, y in zip(probabilities, labels):
            counts.add(p[label], y == label)
        per_class[str(label)] = {"ece": counts.ece, "brier": counts.brier}
    return per_class


def calibrate_model(model_folder: Path, gt_folder: Path, folds: Sequence[str],
                    train_command: Callable[[str], str]) -> dict:
    """Fit, evaluate and write ``calibration.json``; returns what it wrote. ``train_command(fold)`` is the command
    that trains the fold, for the error that asks for its validation probabilities."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = load_json(str(model_folder / "dataset.json"))
    plans = PlansManager(str(model_folder / "plans.json"))
    label_manager = plans.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise NnDiffSegError(f"{model_folder} predicts regions (sigmoid per region); nnDiffSeg_calibrate fits a "
                             f"softmax temperature and supports label-based models only")
    ignore = label_manager.ignore_label if label_manager.has_ignore_label else None
    reader = plans.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    per_fold, all_p, all_y, fold_temperatures = {}, [], [], {}
    for fold in folds:
        probabilities, labels = [], []
        for file in _fold_cases(model_folder, fold, train_command):
            reference = gt_folder / (file.name[:-len(".npz")] + ending)
            if not reference.is_file():
                raise NnDiffSegError(f"no reference {reference} for the validation probabilities {file}")
            seg = reader.read_seg(str(reference))[0][0].astype(np.int64)
            p = load_array(str(file), "probabilities", "class probabilities").astype(np.float32)
            if p.shape[1:] != seg.shape:
                raise NnDiffSegError(f"{file} holds probabilities of shape {p.shape}, which does not fit the reference "
                                     f"{reference} of shape {seg.shape}")
            probabilities.append(p)
            labels.append(seg)
        fold_temperatures[fold] = fit_temperature(*pool_pixels(probabilities, labels), ignore_label=ignore)
        per_fold[fold] = len(labels)
        all_p += probabilities
        all_y += labels
    temperature = fit_temperature(*pool_pixels(all_p, all_y), ignore_label=ignore)
    num_classes = all_p[0].shape[0]
    scaled = [scale_probabilities(p, temperature) for p in all_p]
    result = {"temperature": temperature, "fitted_on": "every fold's validation pixels, pooled",
              "folds": list(folds), "cases_per_fold": per_fold, "temperature_per_fold": fold_temperatures,
              "before": _counts(all_p, all_y, num_classes), "after": _counts(scaled, all_y, num_classes)}
    write_json(model_folder / CALIBRATION_FILE, result)
    return result


def ece_rose(result: dict) -> Optional[str]:
    """A line for a fit whose temperature raised some class's ECE on the validation cases, else None."""
    rose = [label for label in result["before"] if result["after"][label]["ece"] > result["before"][label]["ece"]]
    if not rose:
        return None
    return (f"note: T raised the ECE of class(es) {', '.join(rose)} on the folds' validation cases (T minimises the "
            f"likelihood, not ECE); if held-out cases confirm it, predict this model with --no_calibration")


def calibrate_and_report(model_folder: Path, folds: Sequence[str], dataset_name_or_id: str, configuration: str,
                         trainer: str, plans: str) -> float:
    """``calibrate_model`` against the dataset's ``gt_segmentations``, with the report both CLIs print; returns T."""
    from nndiffseg.utils import check_nnunet_paths, dataset_name_from_id
    check_nnunet_paths("nnUNet_preprocessed")
    gt_folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name_from_id(dataset_name_or_id) / "gt_segmentations"
    result = calibrate_model(model_folder, gt_folder, folds, lambda fold: (
        f"nnDiffSeg_train {dataset_name_or_id} {configuration} {fold} -tr {trainer} -p {plans}"))
    print(f"temperature {result['temperature']:.3f} (per fold: "
          f"{', '.join(f'{f}: {t:.3f}' for f, t in result['temperature_per_fold'].items())})")
    for label in result["before"]:
        b, a = result["before"][label], result["after"][label]
        print(f"class {label}: ECE {b['ece']:.4f} -> {a['ece']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f} "
              f"(the folds' validation cases)")
    if note := ece_rose(result):
        print(note)
    print(f"written to {model_folder / CALIBRATION_FILE}")
    return result["temperature"]


def calibrate_entry() -> None:
    parser = argparse.ArgumentParser(
        prog="nnDiffSeg_calibrate",
        description="Fit a temperature for a trained model on its folds' validation probabilities (nnDiffSeg_train "
                    "... --npz), pooled; write calibration.json into the model folder, which nnDiffSeg_predict then "
                    "applies to the probabilities it exports (--no_calibration turns it off). Reports ECE and Brier "
                    "before and after.")
    parser.add_argument("dataset_name_or_id", help="dataset name or ID")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainer")
    parser.add_argument("-p", "--plans", default=None, help="plans identifier (default nnDiffSegPlans)")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: every fold with a final "
                                                                       "checkpoint)")
    args = parser.parse_args()

    def main() -> int:
        from nndiffseg.inference.predict import _check_folds, _resolve_model_folder
        from nndiffseg.planning import PLANS_NAME
        from nndiffseg.utils import check_nnunet_paths
        check_nnunet_paths("nnUNet_preprocessed", "nnUNet_results")
        plans = args.plans or PLANS_NAME
        model_folder = _resolve_model_folder(args.dataset_name_or_id, args.trainer, plans, args.configuration)
        folds = _check_folds(model_folder, args.folds, "checkpoint_final.pth")
        calibrate_and_report(model_folder, folds, args.dataset_name_or_id, args.configuration, args.trainer, plans)
        return 0
    run_cli(main)


if __name__ == "__main__":
    calibrate_entry()
