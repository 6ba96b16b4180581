"""Temperature scaling of class probabilities (Guo et al., 2017), fitted on the probabilities nnU-Net already keeps.

nnU-Net exports softmax(logits); log p equals the logits up to a constant per pixel, which the softmax cancels, so
softmax(log p / T) is the temperature-scaled softmax without the logits. T > 1 softens over-confident
probabilities, T < 1 sharpens under-confident ones. T is fitted by minimising the negative log-likelihood of the
reference labels over pixels pooled from every case (a seeded subset above ``MAX_PIXELS``). Pure numpy / scipy.
"""
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

MAX_PIXELS = 2_000_000
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
PROBABILITY_FLOOR = 1e-7  # float32 softmax underflows to 0 where nnU-Net is sure; log needs a floor


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, None))


def scale_probabilities(probabilities: np.ndarray, temperature: float, axis: int = 0) -> np.ndarray:
    """softmax(log p / T) along ``axis`` (the class axis), in the input's float type."""
    scaled = _log_probabilities(probabilities) / temperature
    scaled -= scaled.max(axis=axis, keepdims=True)
    np.exp(scaled, out=scaled)
    scaled /= scaled.sum(axis=axis, keepdims=True)
    return scaled.astype(np.asarray(probabilities).dtype if np.asarray(probabilities).dtype.kind == "f" else np.float32)


def negative_log_likelihood(log_probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``labels`` (N,) under softmax(log_probabilities / T); log_probabilities (C, N)."""
    scaled = log_probabilities / temperature
    top = scaled.max(axis=0)
    log_norm = top + np.log(np.exp(scaled - top).sum(axis=0))
    return float(np.mean(log_norm - scaled[labels, np.arange(labels.size)]))


def pool_pixels(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_pixels: int = MAX_PIXELS,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(C, N) probabilities and (N,) labels pooled from cases of (C, *spatial) and (*spatial); a seeded random
    subset of ``max_pixels`` where there are more (each case contributes in proportion to its size)."""
    p = np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in probabilities], axis=1)
    y = np.concatenate([np.asarray(x).ravel() for x in labels]).astype(np.int64)
    if y.size > max_pixels:
        keep = np.random.default_rng(seed).choice(y.size, max_pixels, replace=False)
        p, y = p[:, keep], y[keep]
    return p, y


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    ignore_label: Optional[int] = None) -> float:
    """The T that minimises the NLL of ``labels`` (N,) under softmax(log p / T); probabilities (C, N).
    Pixels carrying ``ignore_label`` are left out."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels).astype(np.int64)
    if ignore_label is not None:
        keep = labels != ignore_label
        probabilities, labels = probabilities[:, keep], labels[keep]
    if labels.size == 0:
        raise ValueError("no labelled pixels to fit a temperature on")
    if labels.min() < 0 or labels.max() >= probabilities.shape[0]:
        raise ValueError(f"labels from {labels.min()} to {labels.max()} for {probabilities.shape[0]} classes")
    log_p = _log_probabilities(probabilities)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(log_p, labels, float(np.exp(log_t))),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
