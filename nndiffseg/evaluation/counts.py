"""Per-class true/false positive and false negative counts of label maps, as nnU-Net's pseudo Dice sums
them over a validation epoch; pixels at the ignore label, or marked invalid, are left out. Torch only."""
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn


def hard_counts(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int,
                ignore_label: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn) per foreground class 1..num_classes-1, from label maps (B, H, W) against (B, 1, H, W) or
    (B, H, W). Reference pixels below 0 (nnU-Net's outside-the-crop -1) count as background."""
    ref = (reference[:, 0] if reference.ndim == 4 else reference).long()
    valid = torch.ones_like(ref, dtype=torch.bool) if ignore_label is None else ref != ignore_label
    ref = ref.clamp_min(0)
    pred = prediction.long()
    tp, fp, fn = (np.zeros(num_classes - 1, np.int64) for _ in range(3))
    for c in range(1, num_classes):
        p, r = (pred == c) & valid, (ref == c) & valid
        tp[c - 1] = int((p & r).sum())
        fp[c - 1] = int((p & ~r).sum())
        fn[c - 1] = int((~p & r).sum())
    return tp, fp, fn


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> list[float]:
    return [float(2 * a / max(2 * a + b + c, 1)) for a, b, c in zip(tp, fp, fn)]


def pad_to_multiple(labels: torch.Tensor, multiple: int) -> torch.Tensor:
    """(..., H, W) labels padded with background to edges divisible by ``multiple``."""
    h, w = labels.shape[-2:]
    return nn.functional.pad(labels, (0, -w % multiple, 0, -h % multiple))


@torch.no_grad()
def reconstruction_dice(head, label_maps: Iterable[torch.Tensor], multiple: int = 8) -> dict:
    """A mask autoencoder head's reconstruction Dice per foreground class ({"1": ..., ...}) over whole label
    maps (1, H, W) (the autoencoder is convolutional: no patches), each padded to a multiple of its
    downsampling."""
    num_classes, ignore = head.num_classes, head.config.get("ignore_label")
    tp = fp = fn = 0
    for labels in label_maps:
        labels = pad_to_multiple(labels, multiple)
        counts = hard_counts(head.reconstruct(labels), labels, num_classes, ignore)
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    return {str(c + 1): d for c, d in enumerate(dice_from_counts(tp, fp, fn))}
