"""Overlap metrics for binary masks and label maps: Dice, IoU (Jaccard) and SDMC-Seg's tolerant IoU.

Pure numpy/scipy; no nnU-Net imports. Empty masks follow one rule for all three metrics:

* reference and prediction both empty -> NaN (undefined; excluded from means, as nnU-Net does);
* exactly one of them empty            -> 0.0.
"""
from typing import Iterable

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "iou", "tiou")

_SQUARE_3X3 = np.ones((3, 3), dtype=bool)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|); NaN when both masks are empty, 0 when only one is."""
    pred, ref = _check_pair(pred, ref)
    denominator = int(pred.sum()) + int(ref.sum())
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denominator


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """IoU (Jaccard) = |P ∩ G| / |P ∪ G|; NaN when both masks are empty, 0 when only one is."""
    pred, ref = _check_pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(pred, ref).sum()) / union


def _slice_structure(ndim: int) -> np.ndarray:
    if ndim == 2:
        return _SQUARE_3X3
    if ndim == 3:
        # Extent 1 along axis 0: the 3x3 square acts within each slice, never across slices.
        return _SQUARE_3X3[None]
    raise ValueError(f"tolerant IoU needs a 2D or 3D mask, got {ndim} dimensions")


def tolerant_iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """SDMC-Seg's tolerant IoU: tIoU = |P ∩ dilate(G)| / |erode(G) ∪ P|.

    Dilation and erosion are binary, with a full 3x3 square structuring element (one pixel of
    tolerance in every direction, diagonals included). A 3D mask is treated as a stack of 2D slices
    along its first axis: each slice is dilated/eroded on its own, nothing spreads between slices.
    Erosion treats everything outside the image as background (scipy's ``border_value=0``), so
    foreground touching the image border is eroded there too.

    Because P ∩ G ⊆ P ∩ dilate(G) and erode(G) ∪ P ⊆ G ∪ P, tIoU >= IoU always; and since
    P ∩ dilate(G) ⊆ P, tIoU <= 1. A prediction that differs from the reference only by one pixel
    along the boundary (e.g. the reference dilated or eroded once) scores exactly 1.

    Empty masks: NaN when G and P are both empty; 0 otherwise whenever the denominator is empty
    (G non-empty, P empty, erode(G) empty) or the numerator is (one of G, P empty).
    """
    pred, ref = _check_pair(pred, ref)
    if not pred.any() and not ref.any():
        return float("nan")
    structure = _slice_structure(ref.ndim)
    dilated = ndimage.binary_dilation(ref, structure=structure)
    eroded = ndimage.binary_erosion(ref, structure=structure, border_value=0)
    denominator = int(np.logical_or(eroded, pred).sum())
    if denominator == 0:
        return 0.0
    return int(np.logical_and(pred, dilated).sum()) / denominator


def compute_case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray,
                         labels: Iterable[int]) -> dict[int, dict[str, float]]:
    """Dice, IoU and tIoU of each label in ``labels`` between two label maps of the same shape.

    Returns ``{label: {"dice": ., "iou": ., "tiou": .}}``; a label absent from both maps gets NaN.
    """
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    result = {}
    for label in labels:
        pred = pred_labels == label
        ref = ref_labels == label
        result[int(label)] = {"dice": dice(pred, ref), "iou": iou(pred, ref), "tiou": tolerant_iou(pred, ref)}
    return result
