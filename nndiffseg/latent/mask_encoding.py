"""How label maps enter and leave the mask autoencoder.

A label map with C classes (background included) becomes a one-hot image scaled to [-1, 1], one channel
per class. Stable Diffusion's autoencoder has 3 channels, which is exactly SDMC-Seg's mapping for its
3 classes (non-stroke, ischemic, hemorrhagic -> R, G, B); fewer classes pad the unused channels with -1
(class absent everywhere), more classes need an autoencoder with C channels. Decoding takes the first C
channels as class scores: argmax over them is the segmentation.
"""
from typing import Optional

import torch

from nndiffseg.guided.mask_encoding import encode_labels as one_hot_mask

# decoded channels live in about [-1, 1]; scaling them makes softmax probabilities reflect the margin
SCORE_SHARPNESS = 5.0


def mask_channels(num_classes: int) -> int:
    return max(3, num_classes)


def encode_labels(labels: torch.Tensor, num_classes: int, ignore_label: Optional[int] = None) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels -> (B, mask_channels, H, W) one-hot in {-1, 1}: the guided
    head's encoding over ``mask_channels(num_classes)`` channels, so the padding channels are -1 everywhere.
    nnU-Net's -1 (outside the nonzero crop) is background; pixels at ``ignore_label`` are 0 in every channel
    (the losses leave them out)."""
    return one_hot_mask(labels, mask_channels(num_classes), ignore_label)


def decoded_to_scores(decoded: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Autoencoder output -> (B, num_classes, H, W) class scores (logits for nnU-Net's softmax)."""
    return decoded[:, :num_classes] * SCORE_SHARPNESS
