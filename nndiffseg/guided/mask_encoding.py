"""The diffusion variable: a label map as a one-hot image over all classes (background included), scaled to
[-1, 1], one channel per class; and back from a sampled mask to class probabilities.

Back to probabilities by inverting the scaling, (x + 1) / 2, clipped to [0, 1] and renormalised over the
classes, rather than by a softmax: a sample that lands on a clean one-hot mask becomes exactly that
one-hot probability, so sampled masks stay as decided as the model made them and the spread across
samples (not a softmax temperature chosen here) is what expresses uncertainty. A pixel where every
channel is at -1 (no class claimed) becomes uniform.
"""
import torch

_EPS = 1e-6


def encode_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels -> (B, num_classes, H, W) one-hot in {-1, 1}."""
    if labels.ndim == 4:
        labels = labels[:, 0]
    one_hot = torch.nn.functional.one_hot(labels.long().clamp_min(0), num_classes)
    return one_hot.permute(0, 3, 1, 2).float() * 2 - 1


def mask_to_probabilities(mask: torch.Tensor) -> torch.Tensor:
    """(..., num_classes, H, W) sampled mask in about [-1, 1] -> class probabilities summing to 1 over dim -3."""
    scores = ((mask + 1) / 2).clamp(0, 1) + _EPS
    return scores / scores.sum(dim=-3, keepdim=True)
