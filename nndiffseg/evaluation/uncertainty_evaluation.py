"""Calibration and failure detection for ``nnDiffSeg_evaluate``: read each case's probabilities (nnU-Net's
``--save_probabilities`` CASE.npz) and uncertainty map (nnDiffSeg_predict's ``uncertainty/CASE.npz``), keep
per case what the dataset-level numbers need, and pool them.

Uncertainty sources, each scored by the same code:
- ``entropy``: the normalised entropy of the predicted probabilities (nnU-Net's softmax for nnU-Net's
  trainers; the fused samples' probabilities for the guided trainers);
- ``spread``: the guided trainers' uncertainty map, as written by ``nnDiffSeg_predict --save_uncertainty`` (a
  standard deviation: the samples' spread, or the total that adds the prior's variance; ``--uncertainty``);
- ``pairwise_dice``: a case-level source, 1 - the mean Dice between the prediction's members (its ``samples/``,
  written by ``nnDiffSeg_predict --save_samples``: a guided model's samples, or each fold's mask); its pixel
  metrics are NaN.
"""
import os
import zlib
from typing import Any, Optional, Sequence

import numpy as np

from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.multirater_metrics import pairwise_dice_per_label
from nndiffseg.evaluation.uncertainty_metrics import (
    CalibrationCounts,
    aurc,
    case_spearman,
    failure_detection,
    normalized_entropy,
    subsample_indices,
)
from nndiffseg.inference.prediction_folder import UNCERTAINTY_KEY, load_array

PROBABILITIES_KEY = "probabilities"  # nnU-Net's export_prediction_from_logits
# Pixels per case kept for the pooled pixel AUROC and overlap: exact below, a seeded random subset above
# (a 512 x 512 image has 262144 pixels, so 2D images are kept whole).
PIXELS_PER_CASE = 300_000


def find_case_files(folder: Optional[str], cases: list[str], role: str) -> Optional[dict[str, str]]:
    """Case -> ``folder/CASE.npz`` when every case has one; None when none has one (or no folder); an error
    naming the missing cases when only some do."""
    if folder is None or not os.path.isdir(folder):
        return None
    found = {c: os.path.join(folder, f"{c}.npz") for c in cases if os.path.isfile(os.path.join(folder, f"{c}.npz"))}
    if not found:
        return None
    missing = [c for c in cases if c not in found]
    if missing:
        raise NnDiffSegError(f"{len(missing)} case(s) have no {role} .npz in {folder} while others have: "
                             f"{', '.join(missing[:10])}{' and more' if len(missing) > 10 else ''}")
    return found


def load_case_array(file: str, key: str, expected_shape: tuple, what: str) -> np.ndarray:
    array = load_array(file, key, what)
    if array.shape[-len(expected_shape):] != expected_shape or array.ndim not in (len(expected_shape),
                                                                                   len(expected_shape) + 1):
        raise NnDiffSegError(f"{file} holds {what} of shape {array.shape}, which does not fit the label map's "
                             f"shape {expected_shape}")
    if not np.all(np.isfinite(array)):
        raise NnDiffSegError(f"{file} holds NaN or infinite values")
    return array


def case_uncertainty_data(case: str, ref: np.ndarray, pred: np.ndarray, probability_file: Optional[str],
                          uncertainty_file: Optional[str], samples: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """What one case adds: calibration counts per label, each source's mean uncertainty, the kept pixels
    (each source's values with the reference and predicted labels there), and with two or more ``samples``
    (label maps) their pairwise Dice per label that occurs in any map of the case (absent labels agree: 1)."""
    result: dict[str, Any] = {"calibration": {}, "mean_uncertainty": {}, "pixels": {}}
    if len(samples) >= 2:
        present = np.unique(np.concatenate([np.unique(x) for x in (ref, pred, *samples)]))
        result["pairwise_dice"] = pairwise_dice_per_label(samples, present)
    maps = {}
    if probability_file is not None:
        probabilities = load_case_array(probability_file, PROBABILITIES_KEY, ref.shape, "class probabilities")
        if probabilities.ndim != ref.ndim + 1 or probabilities.shape[0] < 2:
            raise NnDiffSegError(f"{probability_file} holds probabilities of shape {probabilities.shape}; expected "
                                 f"(classes, {', '.join(map(str, ref.shape))})")
        for label in range(1, probabilities.shape[0]):  # channel c is label c (nnU-Net's order)
            result["calibration"][label] = CalibrationCounts().add(probabilities[label], ref == label)
        maps["entropy"] = normalized_entropy(probabilities)
    if uncertainty_file is not None:
        spread = load_case_array(uncertainty_file, UNCERTAINTY_KEY, ref.shape, "an uncertainty map")
        maps["spread"] = spread.reshape(ref.shape).astype(np.float32)
    if maps:
        keep = subsample_indices(ref.size, PIXELS_PER_CASE, seed=zlib.crc32(case.encode()))
        take = (lambda a: a.ravel()) if keep is None else (lambda a: a.ravel()[keep])
        result["pixels"] = {"ref": take(ref).astype(np.int32), "pred": take(pred).astype(np.int32),
                            **{name: take(m) for name, m in maps.items()}}
        result["mean_uncertainty"] = {name: float(m.mean()) for name, m in maps.items()}
    return result


def summarize_uncertainty(results: list[dict], case_entries: list[dict], labels: list[int]) -> dict[str, Any]:
    """The dataset-level ``calibration`` and ``uncertainty`` blocks of summary.json (empty when no case had
    probabilities or maps). ``case_entries`` hold each case's Dice per label and mean, in ``results``' order."""
    summary: dict[str, Any] = {}
    if results and results[0]["calibration"]:
        per_class = {}
        for label in labels:
            counts = CalibrationCounts()
            for r, c in zip(results, case_entries):
                if label not in r["calibration"]:
                    raise NnDiffSegError(f"the probabilities of case {c['case']} have no channel for label {label}")
                counts += r["calibration"][label]
            mean_probability, observed = counts.reliability()
            per_class[str(label)] = {"ece": counts.ece, "brier": counts.brier, "reliability": {
                "mean_probability": mean_probability.tolist(), "observed_fraction": observed.tolist(),
                "pixels": counts.count[counts.count > 0].tolist()}}
        summary["calibration"] = {
            "per_class": per_class,
            "mean": {m: float(np.mean([per_class[str(label)][m] for label in labels])) for m in ("ece", "brier")}}
    sources = list(results[0]["mean_uncertainty"]) if results else []
    members = bool(results) and all("pairwise_dice" in r for r in results)
    if not sources and not members:
        return summary
    summary["uncertainty"] = {}
    if sources:
        ref = np.concatenate([r["pixels"]["ref"] for r in results])
        pred = np.concatenate([r["pixels"]["pred"] for r in results])
    for source in sources:
        u = np.concatenate([r["pixels"][source] for r in results])
        case_u = [r["mean_uncertainty"][source] for r in results]
        block = {"per_class": {}}
        for label in labels:
            risk = [1.0 - c["metrics"][str(label)]["dice"] for c in case_entries]
            block["per_class"][str(label)] = failure_detection(u, (pred == label) != (ref == label), case_u, risk)
        # every label at once: a pixel is wrong when its label is; a case's risk is 1 - its mean Dice
        block["all_labels"] = failure_detection(u, pred != ref, case_u, [1.0 - c["mean"]["dice"] for c in case_entries])
        block["case_mean_uncertainty"] = case_u
        summary["uncertainty"][source] = block
    if members:
        summary["uncertainty"]["pairwise_dice"] = _pairwise_dice_block(results, case_entries, labels)
    return summary


def _case_level(case_u: list[float], risk: list[float]) -> dict[str, float]:
    return {"pixel_auroc": float("nan"), "uncertainty_error_overlap": float("nan"),
            "case_spearman": case_spearman(case_u, risk), "aurc": aurc(case_u, risk)}


def _pairwise_dice_block(results: list[dict], case_entries: list[dict], labels: list[int]) -> dict[str, Any]:
    """The ``pairwise_dice`` source: a case's uncertainty is 1 - its members' pairwise Dice (per label; over all
    labels their mean), scored against its 1 - Dice like the maps' case means (no pixel metrics)."""
    case_u = {label: [1.0 - r["pairwise_dice"].get(label, 1.0) for r in results] for label in labels}
    overall = [float(np.mean([case_u[label][i] for label in labels])) for i in range(len(results))]
    return {"per_class": {str(label): _case_level(case_u[label], [1.0 - c["metrics"][str(label)]["dice"]
                                                                  for c in case_entries]) for label in labels},
            "all_labels": _case_level(overall, [1.0 - c["mean"]["dice"] for c in case_entries]),
            "case_mean_uncertainty": overall}
