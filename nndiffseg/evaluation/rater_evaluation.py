"""Scoring against several raters for ``nnDiffSeg_evaluate -raters FOLDER``: each case's sample set (the
prediction folder's ``samples/sample_K/CASE``, written by ``nnDiffSeg_predict --save_samples``; without them the
prediction is the one sample) against its raters' masks (``CASE_raterNN``, as ``nnDiffSeg_convert_multirater``
writes them to ratersTr/ratersTs), per foreground class, with ``multirater_metrics``: GED, HM-IoU, diversity, Dice
of the fused prediction against the majority and against each rater, calibration of the probabilities against
the raters' frequency, NCC of the uncertainty map with the raters' disagreement."""
import os
import re
from typing import Any, Optional

import numpy as np

from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.multirater_metrics import MULTIRATER_METRIC_NAMES, multirater_case_metrics
from nndiffseg.inference.prediction_folder import SAMPLES_FOLDER
from nndiffseg.planning.raters import rater_file_name

RATER_FILE = re.compile(r"(.+)_rater(\d{2,})")
SAMPLE_FOLDER = re.compile(r"sample_(\d+)")


def find_rater_files(folder: str, cases: list[str], ending: str) -> dict[str, list[str]]:
    """Case -> its raters' label maps ``folder/CASE_rater01<ending>``, ...: every case needs as many raters as the
    case with the most (a missing one is named)."""
    if not os.path.isdir(folder):
        raise NnDiffSegError(f"raters folder not found: {folder}")
    found: dict[str, dict[int, str]] = {}
    for name in os.listdir(folder):
        match = RATER_FILE.fullmatch(name[:-len(ending)]) if name.endswith(ending) else None
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, name)
    count = max((max(r) for r in found.values()), default=0)
    if not count:
        raise NnDiffSegError(f"no rater masks named CASE_rater01{ending}, CASE_rater02{ending}, ... in {folder}")
    files = {}
    for case in cases:
        raters = found.get(case, {})
        missing = [r for r in range(1, count + 1) if r not in raters]
        if missing:
            raise NnDiffSegError(f"missing rater mask {os.path.join(folder, rater_file_name(case, missing[0], ending))}"
                                 f" (other cases have {count} raters)")
        files[case] = [raters[r] for r in range(1, count + 1)]
    return files


def find_sample_files(prediction_folder: str, cases: list[str], ending: str) -> Optional[dict[str, list[str]]]:
    """Case -> its samples' label maps (``samples/sample_K/CASE<ending>``, K in order); None without samples."""
    root = os.path.join(prediction_folder, SAMPLES_FOLDER)
    folders = sorted((int(m.group(1)), os.path.join(root, name)) for name in
                     (os.listdir(root) if os.path.isdir(root) else ()) if (m := SAMPLE_FOLDER.fullmatch(name)))
    if not folders:
        return None
    files = {case: [os.path.join(folder, case + ending) for _, folder in folders] for case in cases}
    for case_files in files.values():
        for file in case_files:
            if not os.path.isfile(file):
                raise NnDiffSegError(f"missing sample {file}: {root} holds {len(folders)} sample folders, each needs "
                                     f"every case")
    return files


def case_rater_metrics(prediction: np.ndarray, raters: list[np.ndarray], samples: list[np.ndarray],
                       labels: list[int], probabilities: Optional[np.ndarray] = None,
                       uncertainty: Optional[np.ndarray] = None) -> dict[str, dict[str, float]]:
    """Label -> ``multirater_case_metrics`` of the label's masks; ``probabilities`` (classes, *spatial)."""
    return {str(label): multirater_case_metrics(
        np.stack([s == label for s in samples]), np.stack([r == label for r in raters]),
        None if probabilities is None else probabilities[label], uncertainty, prediction == label)
        for label in labels}


def summarize_raters(case_entries: list[dict[str, Any]], labels: list[int]) -> dict[str, Any]:
    """The dataset-level ``raters`` block: each metric's mean over cases per class (NaN left out), then over
    classes."""
    def mean(values) -> float:
        finite = [v for v in values if not np.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    per_class = {str(label): {m: mean(c["raters"][str(label)][m] for c in case_entries)
                              for m in MULTIRATER_METRIC_NAMES} for label in labels}
    return {"per_class": per_class,
            "mean": {m: mean(per_class[str(label)][m] for label in labels) for m in MULTIRATER_METRIC_NAMES}}
