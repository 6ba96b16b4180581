"""The diffusion variable of both heads: a label map as a one-hot image scaled to [-1, 1], one channel per
class (background included); and back from a sampled mask to class probabilities or scores.

Back to probabilities by inverting the scaling, (x + 1) / 2, clipped to [0, 1] and renormalised over the
classes, rather than by a softmax: a sample that lands on a clean one-hot mask becomes exactly that
one-hot probability, so sampled masks stay as decided as the model made them and the spread across
samples (not a softmax temperature chosen here) is what expresses uncertainty. A pixel where every
channel is at -1 (no class claimed) becomes uniform.

The latent head's mask autoencoder has at least 3 channels (Stable Diffusion's, exactly SDMC-Seg's mapping of
its 3 classes to R, G, B): fewer classes pad the unused channels with -1 (class absent everywhere); decoding
takes the first C channels as class scores.
"""
from typing import Optional

import torch

EPS = 1e-6
# decoded channels live in about [-1, 1]; scaling them makes softmax probabilities reflect the margin
SCORE_SHARPNESS = 5.0


def encode_labels(labels: torch.Tensor, channels: int, ignore_label: Optional[int] = None) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels -> (B, channels, H, W) one-hot in {-1, 1} (channels beyond the
    classes are -1 everywhere). nnU-Net's -1 (outside the nonzero crop) is background; pixels at
    ``ignore_label`` are 0 in every channel (no class claimed nor denied: the losses leave them out)."""
    if labels.ndim == 4:
        labels = labels[:, 0]
    labels = labels.long()
    ignored = labels == ignore_label if ignore_label is not None else None
    if ignored is not None:
        labels = labels.masked_fill(ignored, 0)
    one_hot = torch.nn.functional.one_hot(labels.clamp_min(0), channels).permute(0, 3, 1, 2).float() * 2 - 1
    return one_hot if ignored is None else one_hot.masked_fill(ignored[:, None], 0.0)


def mask_to_probabilities(mask: torch.Tensor) -> torch.Tensor:
    """(..., num_classes, H, W) sampled mask in about [-1, 1] -> class probabilities summing to 1 over dim -3."""
    scores = ((mask + 1) / 2).clamp(0, 1) + EPS
    return scores / scores.sum(dim=-3, keepdim=True)


def mask_channels(num_classes: int) -> int:
    """The mask autoencoder's channels for ``num_classes`` classes."""
    return max(3, num_classes)


def decoded_to_scores(decoded: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mask autoencoder output -> (B, num_classes, H, W) class scores (logits for nnU-Net's softmax)."""
    return decoded[:, :num_classes] * SCORE_SHARPNESS
