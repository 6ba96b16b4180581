"""Fusing K diffusion samples of class probabilities (K, B, C, *spatial) into one (B, C, *spatial), and the
per-pixel uncertainty: the samples' spread alone, or the total that adds the prior's own variance.

``mean``: the average of the samples' probabilities (with near one-hot samples, the vote fraction).
``with_prior``: the average of that mean and the prior's probabilities: the U-Net prior and the diffusion
samples as an equal-weight two-member ensemble, as nnU-Net averages the probabilities of the models it
ensembles. One-step samples are near one-hot, so their mean alone takes few values (0, 1/K, ..., 1); the
prior's soft probabilities fill in between.
``staple``: SimpleITK's STAPLE (Warfield et al., 2004), the fusion MedSegDiff uses. Each sample is one
rater: its argmax gives a binary mask per class, binary STAPLE estimates every rater's sensitivity and
specificity for that class and returns the per-pixel probability of the class, weighing reliable samples
more than a plain vote. Binary STAPLE per class is chosen over MultiLabelSTAPLE because it yields
probabilities (MultiLabelSTAPLE returns only a label map); the per-class probabilities are renormalised to
sum to 1 over classes. Where STAPLE is undefined for a class (every sample marks it nowhere, or
everywhere: it returns NaN) the vote fraction is used.
"""
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

FUSIONS = ("mean", "staple", "with_prior")
UNCERTAINTIES = ("spread", "total")
_EPS = 1e-6


def fuse_mean(samples: torch.Tensor) -> torch.Tensor:
    return samples.mean(dim=0)


def _staple(masks: np.ndarray) -> np.ndarray:
    """(K, *spatial) binary masks -> (*spatial) STAPLE probability of the foreground."""
    votes = masks.mean(axis=0)
    if masks.min() == masks.max():
        return votes
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    probability = sitk.GetArrayFromImage(staple.Execute([sitk.GetImageFromArray(m) for m in masks]))
    return np.where(np.isfinite(probability), probability, votes)


def fuse_staple(samples: torch.Tensor) -> torch.Tensor:
    num_samples, batch, num_classes = samples.shape[:3]
    winners = samples.argmax(dim=2).cpu().numpy()  # (K, B, *spatial)
    fused = np.empty((batch, num_classes) + winners.shape[2:], dtype=np.float64)
    for b in range(batch):
        for c in range(num_classes):
            fused[b, c] = _staple((winners[:, b] == c).astype(np.uint8))
    fused = torch.from_numpy(fused).to(device=samples.device, dtype=samples.dtype)
    return fused / fused.sum(dim=1, keepdim=True).clamp_min(_EPS)


def fuse(samples: torch.Tensor, method: str = "mean",
         prior_probabilities: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(K, B, C, *spatial) per-sample class probabilities -> (B, C, *spatial) fused probabilities;
    ``with_prior`` needs the prior's (B, C, *spatial) probabilities."""
    if method == "mean":
        return fuse_mean(samples)
    if method == "staple":
        return fuse_staple(samples)
    if method == "with_prior":
        if prior_probabilities is None:
            raise ValueError("the with_prior fusion needs the prior's probabilities")
        return (fuse_mean(samples) + prior_probabilities) / 2
    raise ValueError(f"unknown fusion '{method}', choose one of {', '.join(FUSIONS)}")


def uncertainty(samples: torch.Tensor) -> torch.Tensor:
    """(K, B, C, *spatial) -> (B, *spatial): the standard deviation across samples of each class probability,
    averaged over classes. It measures only the samples' disagreement (0 where all K agree, and for K = 1),
    unlike the entropy of the fused probabilities, which is also high where every sample is unsure; for
    two classes it is at most 0.5, reached where half the samples say each class."""
    return samples.std(dim=0, correction=0).mean(dim=1)


def total_uncertainty(samples: torch.Tensor, prior_probabilities: torch.Tensor) -> torch.Tensor:
    """(K, B, C, *spatial) samples and the prior's (B, C, *spatial) probabilities -> (B, *spatial): per class
    sqrt(p (1 - p) + variance of the samples), averaged over classes, where p (1 - p) is the variance of the
    class's label when the prior's probability p is read as a coin. The samples alone miss the prior's doubt
    wherever they all follow it (a one-step sampler mostly does); the prior alone misses the samples' doubt.
    In the same units as ``uncertainty`` (a standard deviation), so folds pool the same way; 0 only where the
    prior is sure and every sample agrees, at most sqrt(0.5) for two classes."""
    prior_variance = prior_probabilities * (1 - prior_probabilities)
    return (prior_variance + samples.var(dim=0, correction=0)).sqrt().mean(dim=1)


def uncertainty_map(samples: torch.Tensor, prior_probabilities: torch.Tensor, measure: str = "spread") -> torch.Tensor:
    """(B, *spatial) uncertainty of one of UNCERTAINTIES."""
    if measure == "spread":
        return uncertainty(samples)
    if measure == "total":
        return total_uncertainty(samples, prior_probabilities)
    raise ValueError(f"unknown uncertainty '{measure}', choose one of {', '.join(UNCERTAINTIES)}")
