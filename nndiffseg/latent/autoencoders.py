"""KL-f8 autoencoders and latent denoisers from diffusers, in two sizes, and loading of pretrained weights.

``sd``: Stable Diffusion's KL-f8 autoencoder architecture (so its weights load) and a latent-diffusion
UNet of comparable size; it downsamples 8x (KL-f8). ``compact``: a small mask autoencoder (masks are simple)
and a light denoiser, trained from scratch, downsampling 8x or 4x (``latent_downsampling``: an f8 latent of a
128 px patch is 16 x 16, too coarse for lesion borders). Both have a 4-channel latent; the denoiser halves
the latent three more times, the k = 3 of nnDiffSegPlans (patch edges are multiples of 64).
"""
import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, UNet2DModel

LATENT_CHANNELS = 4
PRESETS = ("sd", "compact")
DOWNSAMPLINGS = (4, 8)
MIN_LATENT_EDGE = 32  # the smallest latent edge latent_downsampling() accepts before choosing a finer factor

_AUTOENCODER = {
    # Stable Diffusion v1/v2's vae/config.json
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               mid_block_add_attention=True),
    "compact": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                    mid_block_add_attention=False),
}
_DENOISER = {
    "sd": dict(block_out_channels=(192, 384, 768, 768), layers_per_block=2,
               down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
    "compact": dict(block_out_channels=(64, 128, 128, 256), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
}


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}', choose one of {', '.join(PRESETS)}")


def latent_downsampling(patch_size, preset: str = "compact") -> int:
    """The autoencoder's downsampling factor for a patch: 8 (SD's KL-f8) when the latent keeps at least
    MIN_LATENT_EDGE cells per edge, else 4; always 8 for the ``sd`` preset (its pretrained architecture)."""
    _check_preset(preset)
    return 8 if preset == "sd" or min(patch_size) >= 8 * MIN_LATENT_EDGE else 4


def build_autoencoder(preset: str, channels: int = 3, downsampling: int = 8) -> AutoencoderKL:
    _check_preset(preset)
    if downsampling not in DOWNSAMPLINGS or (preset == "sd" and downsampling != 8):
        raise ValueError(f"the {preset} autoencoder downsamples by {'8' if preset == 'sd' else '4 or 8'}, "
                         f"not {downsampling}")
    cfg = dict(_AUTOENCODER[preset])
    n = DOWNSAMPLINGS.index(downsampling) + 3  # blocks: each but the last halves the image
    cfg["block_out_channels"] = cfg["block_out_channels"][:n]
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         **cfg)


def autoencoder_downsampling(autoencoder: AutoencoderKL) -> int:
    return 2 ** (len(autoencoder.config.block_out_channels) - 1)


def build_denoiser(preset: str, in_channels: int = 2 * LATENT_CHANNELS) -> UNet2DModel:
    _check_preset(preset)
    return UNet2DModel(in_channels=in_channels, out_channels=LATENT_CHANNELS, **_DENOISER[preset])


def widen_first_conv(conv: torch.nn.Conv2d, in_channels: int) -> torch.nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs: the pretrained weights on the first channels, zeros on
    the added ones (SDSeg's way of adding the image latent to a pretrained denoiser)."""
    if in_channels == conv.in_channels:
        return conv
    if in_channels < conv.in_channels:
        raise ValueError(f"cannot narrow a convolution from {conv.in_channels} to {in_channels} input channels")
    wider = torch.nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            bias=conv.bias is not None)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            wider.bias.copy_(conv.bias)
    return wider


def _is_local(weights: str) -> bool:
    return Path(weights).exists()


def load_pretrained_autoencoder(weights: str) -> AutoencoderKL:
    """Stable Diffusion's autoencoder from a diffusers repo id or a local folder: either a full pipeline
    (with a ``vae`` subfolder) or an autoencoder folder itself."""
    subfolder = "vae" if (not _is_local(weights) or (Path(weights) / "vae").is_dir()) else None
    return AutoencoderKL.from_pretrained(weights, subfolder=subfolder)


def load_pretrained_denoiser(weights: str, in_channels: int = 2 * LATENT_CHANNELS) -> Optional[UNet2DModel]:
    """The pipeline's ``unet`` when it is a UNet2DModel (latent-diffusion UNets are), with its first
    convolution widened for the image latent; None when there is none or it is another class (Stable
    Diffusion's text-conditioned UNet2DConditionModel cannot take this role)."""
    if _is_local(weights):
        config = Path(weights) / "unet" / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("_class_name") != "UNet2DModel":
            return None
    try:
        unet = UNet2DModel.from_pretrained(weights, subfolder="unet")
    except (OSError, ValueError, TypeError):
        return None
    if unet.config.out_channels != LATENT_CHANNELS:
        return None
    unet.conv_in = widen_first_conv(unet.conv_in, in_channels)
    unet.register_to_config(in_channels=in_channels)
    return unet
