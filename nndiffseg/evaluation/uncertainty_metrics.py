"""How good predicted probabilities and uncertainty maps are: calibration, and pixel- and case-level failure
detection. Pure numpy / scikit-learn / scipy; no nnU-Net imports.

Calibration (per foreground class c, one-vs-rest, pooled over every pixel of every case):
- ECE: pixels binned by their probability of c into 15 equal-width bins on [0, 1];
  ECE = sum over bins of (pixels in bin / all pixels) x |mean probability - fraction that is c|;
- Brier score: the mean squared difference between the probability of c and 1[reference is c].
Both accumulate per case (``CalibrationCounts``), so no image has to be kept.

Failure detection, for a per-pixel uncertainty map u (higher = less sure):
- pixel AUROC: how well u tells wrongly labelled pixels from right ones (0.5: no better than chance);
- uncertainty-error overlap (Jungo et al., 2020): the best Dice, over thresholds, between {u > threshold}
  and the error mask;
- case Spearman: rank correlation between a case's mean u and its 1 - Dice;
- AURC: the area under the risk-coverage curve when cases are kept from the most to the least certain
  (risk = mean 1 - Dice of the kept cases); lower is better, the oracle ordering gives the minimum.

A case-level source needs no map: the pairwise Dice between an ensemble's members (a guided model's samples, the
folds' masks), whose case uncertainty is 1 - the mean Dice over member pairs ("ensemble + pairwise Dice", the best
case confidence in the DKFZ segmentation failure-detection benchmark, Zenk et al., MedIA 2025).
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

NUM_BINS = 15


@dataclass
class CalibrationCounts:
    """Sufficient statistics of ECE and Brier score for one class: per bin the pixel count, the summed
    probability and the number of pixels whose reference is the class; the summed squared error."""
    count: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))
    probability_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))
    squared_error: float = 0.0

    def add(self, probability: np.ndarray, is_class: np.ndarray) -> "CalibrationCounts":
        p = np.clip(np.asarray(probability, dtype=np.float64).ravel(), 0.0, 1.0)
        y = np.asarray(is_class, dtype=bool).ravel()
        bins = np.minimum((p * NUM_BINS).astype(np.int64), NUM_BINS - 1)  # p = 1 falls into the last bin
        self.count += np.bincount(bins, minlength=NUM_BINS)
        self.probability_sum += np.bincount(bins, weights=p, minlength=NUM_BINS)
        self.positive += np.bincount(bins, weights=y, minlength=NUM_BINS).astype(np.int64)
        self.squared_error += float(np.sum((p - y) ** 2))
        return self

    def __iadd__(self, other: "CalibrationCounts") -> "CalibrationCounts":
        self.count += other.count
        self.probability_sum += other.probability_sum
        self.positive += other.positive
        self.squared_error += other.squared_error
        return self

    @property
    def ece(self) -> float:
        total = self.count.sum()
        if total == 0:
            return float("nan")
        filled = self.count > 0
        gap = np.abs(self.probability_sum[filled] - self.positive[filled]) / self.count[filled]
        return float(np.sum(self.count[filled] / total * gap))

    @property
    def brier(self) -> float:
        total = self.count.sum()
        return self.squared_error / total if total else float("nan")

    def reliability(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, observed fraction) of the filled bins, for a reliability diagram."""
        filled = self.count > 0
        return self.probability_sum[filled] / self.count[filled], self.positive[filled] / self.count[filled]


def normalized_entropy(probabilities: np.ndarray) -> np.ndarray:
    """(C, *spatial) class probabilities -> (*spatial) entropy / log(C): 0 for a one-hot pixel, 1 for uniform."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=0) / np.log(p.shape[0])).astype(np.float32)


def pixel_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """AUROC of ``uncertainty`` for separating error pixels from correct ones; NaN without both kinds."""
    error = np.asarray(error, dtype=bool).ravel()
    if error.all() or not error.any():
        return float("nan")
    return float(roc_auc_score(error, np.asarray(uncertainty).ravel()))


def uncertainty_error_overlap(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """max over thresholds th of Dice({u > th}, error), over every threshold that changes the set (each
    distinct value of u, and th below all of them); NaN when there is no error pixel."""
    error = np.asarray(error, dtype=bool).ravel()
    num_errors = int(error.sum())
    if num_errors == 0:
        return float("nan")
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    order = np.argsort(-u, kind="stable")
    u_sorted, hits = u[order], np.cumsum(error[order])
    # a threshold can only keep whole groups of tied values: the last index of each group
    group_ends = np.flatnonzero(np.r_[u_sorted[1:] != u_sorted[:-1], True])
    kept = group_ends + 1
    return float(np.max(2.0 * hits[group_ends] / (kept + num_errors)))


def risk_coverage(case_uncertainty: Sequence[float], case_risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, risk of the k most certain cases) for k = 1..n; cases with NaN risk left out."""
    u, r = np.asarray(case_uncertainty, dtype=np.float64), np.asarray(case_risk, dtype=np.float64)
    keep = np.isfinite(u) & np.isfinite(r)
    u, r = u[keep], r[keep]
    order = np.argsort(u, kind="stable")
    n = np.arange(1, len(r) + 1)
    return n / max(len(r), 1), np.cumsum(r[order]) / n


def aurc(case_uncertainty: Sequence[float], case_risk: Sequence[float]) -> float:
    """Area under the risk-coverage curve: the mean of the curve's risks over k = 1..n."""
    _, risk = risk_coverage(case_uncertainty, case_risk)
    return float(risk.mean()) if len(risk) else float("nan")


def case_spearman(case_uncertainty: Sequence[float], case_risk: Sequence[float]) -> float:
    """Spearman's rank correlation of the cases' mean uncertainty with their risk (1 - Dice)."""
    u, r = np.asarray(case_uncertainty, dtype=np.float64), np.asarray(case_risk, dtype=np.float64)
    keep = np.isfinite(u) & np.isfinite(r)
    if keep.sum() < 3 or np.ptp(u[keep]) == 0 or np.ptp(r[keep]) == 0:
        return float("nan")
    return float(spearmanr(u[keep], r[keep]).statistic)


def failure_detection(uncertainty: np.ndarray, error: np.ndarray, case_uncertainty: Sequence[float],
                      case_risk: Sequence[float]) -> dict:
    """The four failure-detection numbers for pooled pixels (``uncertainty``, ``error``) and per-case values."""
    return {"pixel_auroc": pixel_auroc(uncertainty, error),
            "uncertainty_error_overlap": uncertainty_error_overlap(uncertainty, error),
            "case_spearman": case_spearman(case_uncertainty, case_risk),
            "aurc": aurc(case_uncertainty, case_risk)}


def subsample_indices(num_pixels: int, limit: Optional[int], seed: int) -> Optional[np.ndarray]:
    """At most ``limit`` pixel indices drawn without replacement (seeded), or None to keep every pixel."""
    if limit is None or num_pixels <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_pixels, limit, replace=False))
