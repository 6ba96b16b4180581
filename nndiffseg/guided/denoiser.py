"""The guided denoiser: a diffusers UNet that sees the noisy mask, the image and the prior's class
probabilities (concatenated as channels) and the CLIP text embeddings of the classes.

Two ways in for the text, selected by ``conditioning``:
- ``time`` (GuidedDiff): the text feature is projected to the timestep embedding's size and added to it,
  through UNet2DModel's ``class_embed_type="identity"`` (the projection's output is passed as
  ``class_labels``);
- ``cross_attention``: UNet2DConditionModel attends to the class embeddings, one token per class, at the
  lowest resolution and in the middle block.

The prompts are one per class, the same for every image: in ``time`` mode the text therefore adds a
learned constant to the time embedding, and in ``cross_attention`` mode every image attends to the same
tokens; what the text brings is CLIP's prior on the class names, not information about the image.

Attention sits only at the lowest resolution, so a 256 px patch with four levels attends over 32 x 32.
"""
import math
from typing import Optional, Sequence, Union

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

CONDITIONINGS = ("time", "cross_attention")
# channels per resolution level; each level after the first halves the resolution
SIZES = {"small": (32, 64, 128, 128), "medium": (64, 128, 256, 256)}
HEAD_DIM = 32


class GuidedDenoiser(nn.Module):
    def __init__(self, unet: Union[UNet2DModel, UNet2DConditionModel], num_classes: int, image_channels: int,
                 text_dim: int, conditioning: str):
        super().__init__()
        self.unet = unet
        self.num_classes, self.image_channels, self.text_dim = num_classes, image_channels, text_dim
        self.conditioning = conditioning
        # Flattened, not averaged: the embeddings are in class order like the mask channels, and a mean
        # of L2-normalised prompt features that share most of their words would blur them into one vector.
        self.text_projection = (nn.Linear(num_classes * text_dim, unet.time_embedding.linear_2.out_features)
                                if conditioning == "time" else None)

    def text_condition(self, text_embeddings: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(num_classes, D) or (B, num_classes, D) embeddings -> what the UNet takes for each of ``batch_size``
        images: the time-embedding offset (B, time_embed_dim) or the token sequence (B, num_classes, D)."""
        if text_embeddings.ndim == 2:
            text_embeddings = text_embeddings.unsqueeze(0).expand(batch_size, -1, -1)
        if self.text_projection is not None:
            return self.text_projection(text_embeddings.flatten(1))
        return text_embeddings

    def predict(self, noisy_mask: torch.Tensor, t: torch.Tensor, condition: torch.Tensor,
                text_condition: torch.Tensor) -> torch.Tensor:
        """One denoising call with the condition images (image and prior, concatenated) and the text
        condition already prepared, as the sampling loop reuses them at every step."""
        x = torch.cat([noisy_mask, condition], dim=1)
        if self.conditioning == "time":
            return self.unet(x, t, class_labels=text_condition).sample
        return self.unet(x, t, encoder_hidden_states=text_condition).sample

    def forward(self, noisy_mask: torch.Tensor, t: torch.Tensor, image: torch.Tensor, prior_probs: torch.Tensor,
                text_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes, H, W): the prediction (noise, clean mask or velocity, as trained) for the noisy
        mask (B, num_classes, H, W) at timesteps t, given the image (B, image_channels, H, W), the prior's
        class probabilities (B, num_classes, H, W) and the text embeddings (num_classes, D)."""
        condition = torch.cat([image, prior_probs], dim=1)
        return self.predict(noisy_mask, t, condition, self.text_condition(text_embeddings, noisy_mask.shape[0]))


def _norm_groups(channels: Sequence[int]) -> int:
    groups = math.gcd(*channels)
    return math.gcd(groups, 32)


def build_denoiser(num_classes: int, image_channels: int, text_dim: int, conditioning: str = "time",
                   size: Union[str, Sequence[int]] = "small", patch_size: Optional[Sequence[int]] = None,
                   layers_per_block: int = 1) -> GuidedDenoiser:
    """A guided denoiser for ``num_classes`` mask channels. ``size``: a preset of ``SIZES`` or the channels of
    each resolution level. ``patch_size``, when given, is checked against the levels' downsampling."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"unknown conditioning '{conditioning}', choose one of {', '.join(CONDITIONINGS)}")
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown denoiser size '{size}', choose one of {', '.join(SIZES)} or give the "
                             f"channels of each level")
        size = SIZES[size]
    channels = tuple(int(c) for c in size)
    if len(channels) < 2:
        raise ValueError(f"the denoiser needs at least 2 levels, got channels {channels}")
    factor = 2 ** (len(channels) - 1)
    if patch_size is not None and any(edge % factor for edge in patch_size):
        raise ValueError(f"patch size {tuple(patch_size)} is not divisible by {factor}, the downsampling of a "
                         f"{len(channels)}-level denoiser")
    levels = len(channels)
    common = dict(in_channels=2 * num_classes + image_channels, out_channels=num_classes,
                  block_out_channels=channels, layers_per_block=layers_per_block,
                  norm_num_groups=_norm_groups(channels))
    if conditioning == "time":
        unet = UNet2DModel(down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
                           up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
                           attention_head_dim=min(HEAD_DIM, channels[-1]), class_embed_type="identity", **common)
    else:
        # UNet2DConditionModel's attention_head_dim is the number of heads (a historic misnomer in diffusers)
        unet = UNet2DConditionModel(down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
                                    up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
                                    attention_head_dim=max(1, channels[-1] // HEAD_DIM),
                                    cross_attention_dim=text_dim, **common)
    return GuidedDenoiser(unet, num_classes, image_channels, text_dim, conditioning)
