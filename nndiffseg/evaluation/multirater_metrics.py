"""Metrics of a set of predicted samples against several raters' masks, for one case and one foreground class.
Pure numpy/scipy; no nnU-Net imports.

Inputs: ``samples`` (K, *spatial) and ``raters`` (R, *spatial) binary masks; optionally ``probabilities``
(*spatial) in [0, 1] and an ``uncertainty`` map (*spatial). The raters' frequency map is f = mean over raters.

- GED: the squared generalised energy distance D²_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with
  d = 1 - IoU (Kohl et al., 2018; Baumgartner et al., 2019; Zbinden et al., 2023 report this squared form);
- HM-IoU: the mean IoU of an optimal one-to-one matching of samples to raters (Zbinden et al., 2023, CCDM);
- sample diversity: the mean d over distinct pairs of samples;
- Dice of a fused mask against the raters' majority vote, and its mean Dice against each rater;
- calibration of the probabilities against f: ECE (uncertainty_metrics' 15 equal-width bins) and Brier score;
- NCC (as ValUES, Kahl et al., 2024) between the uncertainty map and the raters' disagreement f (1 - f).

Empty masks: inside d, GED and HM-IoU two empty masks agree perfectly (IoU 1, d 0). Dice keeps metrics.py's rule
(NaN when both masks are empty, left out of means), so the Dice here matches nnDiffSeg_evaluate's.
"""
import math
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from nndiffseg.evaluation.metrics import dice
from nndiffseg.evaluation.uncertainty_metrics import CalibrationCounts

MULTIRATER_METRIC_NAMES = ("ged_squared", "ged_cross", "ged_samples", "ged_raters", "hm_iou", "sample_diversity",
                           "dice_majority", "dice_raters_mean", "ece", "brier", "brier_raters", "ncc")


def _as_stack(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2 or masks.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty stack of masks (N, *spatial), got shape {masks.shape}")
    return masks


def _check_stacks(samples: np.ndarray, raters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    samples, raters = _as_stack(samples, "samples"), _as_stack(raters, "raters")
    if samples.shape[1:] != raters.shape[1:]:
        raise ValueError(f"samples' mask shape {samples.shape[1:]} differs from raters' {raters.shape[1:]}")
    return samples, raters


def _check_map(values: np.ndarray, raters: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != raters.shape[1:]:
        raise ValueError(f"{name} shape {values.shape} differs from the raters' mask shape {raters.shape[1:]}")
    return values


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, *spatial) and (M, *spatial) masks -> (N, M) IoU of every pair; 1 for two empty masks."""
    a = np.asarray(a, dtype=bool).reshape(len(a), -1).astype(np.float64)
    b = np.asarray(b, dtype=bool).reshape(len(b), -1).astype(np.float64)
    intersection = a @ b.T  # integer counts, exact in float64
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - intersection
    return np.divide(intersection, union, out=np.ones_like(intersection), where=union > 0)


def pairwise_dice(masks: Sequence[np.ndarray]) -> float:
    """The mean Dice over every pair of two different members' boolean masks (1 for two empty masks); NaN for
    fewer than two members. Dice = 2 IoU / (1 + IoU) of each pair."""
    if len(masks) < 2:
        return float("nan")
    iou = pairwise_iou(np.stack([np.asarray(x, dtype=bool) for x in masks]), np.stack(masks))
    return float((2 * iou / (1 + iou))[np.triu_indices(len(masks), 1)].mean())


def pairwise_dice_per_label(members: Sequence[np.ndarray], labels: Iterable[int]) -> dict[int, float]:
    """{label: the members' pairwise Dice of that label} for each foreground label (a label no member holds: 1)."""
    return {int(label): pairwise_dice([m == label for m in members]) for label in labels if label != 0}


def generalized_energy_distance_squared(samples: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """The squared generalised energy distance D²_GED (the "GED" of the Probabilistic U-Net, PHiSeg and CCDM
    papers, not its square root) with d = 1 - IoU, d = 0 for two empty masks.

    Each expectation is the mean over all pairs, the diagonal (a mask with itself, d = 0) included, as the
    Probabilistic U-Net's code does; so raters passed as the samples give exactly 0. Returns
    ``{"ged_squared", "ged_cross": E[d(S, Y)], "ged_samples": E[d(S, S')], "ged_raters": E[d(Y, Y')]}``.
    """
    samples, raters = _check_stacks(samples, raters)
    cross = float(np.mean(1.0 - pairwise_iou(samples, raters)))
    among_samples = float(np.mean(1.0 - pairwise_iou(samples, samples)))
    among_raters = float(np.mean(1.0 - pairwise_iou(raters, raters)))
    return {"ged_squared": 2.0 * cross - among_samples - among_raters, "ged_cross": cross,
            "ged_samples": among_samples, "ged_raters": among_raters}


def hungarian_matched_iou(samples: np.ndarray, raters: np.ndarray) -> float:
    """CCDM's HM-IoU: both sets tiled to n = lcm(K, R) masks (the samples n/K times, the raters n/R times), then
    the mean IoU of the one-to-one matching that maximises it (IoU 1 for two empty masks)."""
    samples, raters = _check_stacks(samples, raters)
    k, r = len(samples), len(raters)
    n = math.lcm(k, r)
    iou = pairwise_iou(samples, raters)
    tiled = iou[np.arange(n) % k][:, np.arange(n) % r]  # entry (i, j): sample i mod K against rater j mod R
    rows, cols = linear_sum_assignment(tiled, maximize=True)
    return float(tiled[rows, cols].mean())


def sample_diversity(samples: np.ndarray) -> float:
    """Mean d = 1 - IoU over the K (K - 1) / 2 distinct pairs of samples (d = 0 for two empty masks); 0.0 for a
    single sample, which has no spread. Unlike GED's E[d(S, S')] the diagonal is left out:
    E[d(S, S')] = (K - 1) / K x this."""
    samples = _as_stack(samples, "samples")
    k = len(samples)
    if k == 1:
        return 0.0
    upper = np.triu_indices(k, 1)
    return float(np.mean(1.0 - pairwise_iou(samples, samples)[upper]))


def majority_vote(masks: np.ndarray) -> np.ndarray:
    """(N, *spatial) -> (*spatial): foreground where strictly more than half of the masks mark it; a tie (N even,
    exactly half) is background. For binary masks this is the argmax of the masks' mean one-hot encoding, which
    resolves a tie to the lower label."""
    masks = _as_stack(masks, "masks")
    return 2 * masks.sum(axis=0) > len(masks)


def dice_to_majority(prediction: np.ndarray, raters: np.ndarray) -> float:
    """Dice of ``prediction`` against the raters' majority vote (metrics.dice: NaN when both are empty)."""
    return dice(prediction, majority_vote(raters))


def mean_dice_to_raters(prediction: np.ndarray, raters: np.ndarray) -> float:
    """Mean over raters of Dice(prediction, rater); raters whose Dice is NaN (prediction and rater both empty)
    are left out, NaN when every one is."""
    raters = _as_stack(raters, "raters")
    return _nanmean([dice(prediction, rater) for rater in raters])


def rater_calibration_counts(probabilities: np.ndarray, raters: np.ndarray) -> CalibrationCounts:
    """uncertainty_metrics' calibration statistics of ``probabilities`` against each rater in turn; pool cases
    with ``+=``. Every pixel enters once per rater, so each bin's observed fraction is the bin's mean of f, its
    ECE is the ECE against f, and its Brier score is the mean over raters of the Brier against each rater."""
    raters = _as_stack(raters, "raters")
    probabilities = _check_map(probabilities, raters, "probabilities")
    counts = CalibrationCounts()
    for rater in raters:
        counts.add(probabilities, rater)
    return counts


def calibration_to_raters(probabilities: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """Calibration of ``probabilities`` against the raters' frequency map f = mean over raters.

    - ``ece``: 15 equal-width bins of the probability, sum over bins of (pixels in bin / all pixels) x
      |mean probability - mean f| in the bin;
    - ``brier``: mean (p - f)², the Brier score against the soft target f (0 for p = f);
    - ``brier_raters``: the mean over raters of mean (p - rater)², which equals ``brier`` + mean f (1 - f): the
      raters' disagreement is a floor no p goes below, reached at p = f.

    Probabilities are clipped to [0, 1], as CalibrationCounts does.
    """
    counts = rater_calibration_counts(probabilities, raters)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    f = np.asarray(raters, dtype=bool).mean(axis=0)
    return {"ece": float(counts.ece), "brier": float(np.mean((p - f) ** 2)), "brier_raters": float(counts.brier)}


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """mean((a - mean a)(b - mean b)) / (std a x std b), population standard deviations (Pearson's r of the
    pixels). NaN when either map is constant: the correlation is undefined there, as case_spearman's is."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of {a.size} and {b.size} pixels")
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float(np.mean(a * b) / (np.sqrt(np.mean(a * a)) * np.sqrt(np.mean(b * b))))


def rater_disagreement(raters: np.ndarray) -> np.ndarray:
    """Per-pixel variance of the raters' binary masks: f (1 - f), f the fraction of raters marking the pixel."""
    f = _as_stack(raters, "raters").mean(axis=0)
    return f * (1.0 - f)


def uncertainty_ncc(uncertainty: np.ndarray, raters: np.ndarray) -> float:
    """ValUES' NCC between an uncertainty map and the raters' disagreement map f (1 - f); NaN when either is
    constant (e.g. raters who all agree everywhere)."""
    raters = _as_stack(raters, "raters")
    return normalized_cross_correlation(_check_map(uncertainty, raters, "uncertainty"), rater_disagreement(raters))


def multirater_case_metrics(samples: np.ndarray, raters: np.ndarray, probabilities: Optional[np.ndarray] = None,
                            uncertainty: Optional[np.ndarray] = None,
                            prediction: Optional[np.ndarray] = None) -> dict[str, float]:
    """Every metric of this module for one case and class, as a flat dict with the keys MULTIRATER_METRIC_NAMES,
    always all of them: NaN where a metric is undefined or its input (probabilities, uncertainty) is not given.

    ``prediction`` is the fused mask the Dice values score; by default the samples' majority vote (the argmax of
    the samples' mean, a tie going to background).
    """
    samples, raters = _check_stacks(samples, raters)
    fused = majority_vote(samples) if prediction is None else np.asarray(prediction, dtype=bool)
    if fused.shape != raters.shape[1:]:
        raise ValueError(f"prediction shape {fused.shape} differs from the raters' mask shape {raters.shape[1:]}")
    result = dict.fromkeys(MULTIRATER_METRIC_NAMES, float("nan"))
    result.update(generalized_energy_distance_squared(samples, raters))
    result["hm_iou"] = hungarian_matched_iou(samples, raters)
    result["sample_diversity"] = sample_diversity(samples)
    result["dice_majority"] = dice_to_majority(fused, raters)
    result["dice_raters_mean"] = mean_dice_to_raters(fused, raters)
    if probabilities is not None:
        result.update(calibration_to_raters(probabilities, raters))
    if uncertainty is not None:
        result["ncc"] = uncertainty_ncc(uncertainty, raters)
    return result
