"""The single-step latent diffusion segmenter (SDSeg, MICCAI 2024; SDMC-Seg for several classes).

Training (``forward`` in train mode): the mask is encoded by a frozen mask autoencoder into z0; the image by
a trainable image encoder into c; t is uniform over the 1000-step schedule, z_t = sqrt(a_t) z0 +
sqrt(1 - a_t) eps, and the denoiser sees [z_t, c]. Loss = |eps_hat - eps|_1 + latent_loss_weight x
|z0_hat - z0|_1, where z0_hat is the clean latent recovered from eps_hat (SDSeg's latent estimation loss,
weight 1). With nnU-Net's ignore label, each latent cell is weighted by the fraction of its pixels that carry
a label, so wholly unlabelled cells count for nothing.
Prediction: ONE denoiser call at the last timestep from seeded noise, z0_hat in closed form (DDIM-1 with
trailing spacing is exactly that), decoded by the mask decoder into class scores. ``steps`` > 1 runs the
shared samplers (for comparison).
"""
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from nndiffseg.head import DiffusionHead
from nndiffseg.latent.mask_encoding import decoded_to_scores, encode_labels
from nndiffseg.sampling import (NUM_TRAIN_TIMESTEPS, check_sampler, check_schedule, denoise, sampling_scheduler,
                                training_scheduler)

DEFAULTS = dict(schedule="scaled_linear", prediction_type="epsilon", latent_loss_weight=1.0, sampler="ddim",
                steps=1, seed=0, ignore_label=None, preset=None)


class ImageEncoder(nn.Module):
    """A KL-f8 encoder for the image: nnU-Net's normalised channels -> the autoencoder's 3 input channels
    (one channel, e.g. CT, is repeated as SDMC-Seg does; 3 are taken as they are; any other count goes
    through a learned 1x1 convolution) -> the posterior mode, scaled like SD's latents."""

    def __init__(self, autoencoder: AutoencoderKL, in_channels: int):
        super().__init__()
        ae_channels = autoencoder.config.in_channels
        self.adapter = None if in_channels in (1, ae_channels) else nn.Conv2d(in_channels, ae_channels, 1)
        self.in_channels, self.ae_channels = in_channels, ae_channels
        self.encoder, self.quant_conv = autoencoder.encoder, autoencoder.quant_conv  # its decoder is not needed
        self.scaling_factor = autoencoder.config.scaling_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            image = self.adapter(image)
        elif self.in_channels == 1 and self.ae_channels != 1:
            image = image.expand(-1, self.ae_channels, -1, -1)
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.chunk(2, dim=1)[0] * self.scaling_factor  # the mean of the diagonal Gaussian


class LatentSegmenter(DiffusionHead):
    architecture_settings = ("num_classes", "image_channels", "preset")
    inference_option_names = ("steps", "sampler", "seed")

    def __init__(self, image_autoencoder: AutoencoderKL, mask_autoencoder: AutoencoderKL, denoiser: UNet2DModel,
                 num_classes: int, image_channels: int, **settings):
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"LatentSegmenter got unknown settings {sorted(unknown)}")
        super().__init__()
        self.image_encoder = ImageEncoder(image_autoencoder, image_channels)
        self.mask_autoencoder = mask_autoencoder.requires_grad_(False)
        self.denoiser = denoiser
        # saved with the weights: calibrate_mask_latent_scale sets it from the training masks
        self.register_buffer("mask_latent_scale", torch.tensor(float(mask_autoencoder.config.scaling_factor)))
        self._schedulers: dict = {}
        self.register_to_config(num_classes=num_classes, image_channels=image_channels, **{**DEFAULTS, **settings})

    def check_config(self, config: Mapping) -> None:
        check_schedule(config["schedule"], config["prediction_type"])
        if config["prediction_type"] != "epsilon":
            raise ValueError("the latent head predicts the noise (SDSeg's latent estimation loss needs it)")
        check_sampler(config["sampler"], config["steps"])

    @property
    def num_classes(self) -> int:
        return self._config["num_classes"]

    @property
    def train_scheduler(self):
        key = ("train", self._config["schedule"])
        if key not in self._schedulers:
            self._schedulers[key] = training_scheduler(self._config["schedule"], self._config["prediction_type"])
        return self._schedulers[key]

    def sampling_scheduler(self, sampler: str, steps: int):
        key = ("sample", self._config["schedule"], sampler, steps)
        if key not in self._schedulers:
            self._schedulers[key] = sampling_scheduler(self.train_scheduler, sampler, steps, clip=None)
        return self._schedulers[key]

    def train(self, mode: bool = True) -> "LatentSegmenter":
        super().train(mode)
        self.mask_autoencoder.eval()  # frozen: its dropout/norm statistics never switch to training
        return self

    # ---- set up by the trainer
    def load_mask_autoencoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The fine-tuned mask autoencoder: a MaskAutoencoderHead's state dict (``autoencoder.*`` keys) or an
        AutoencoderKL's own; ValueError if it does not fit."""
        state = {k[len("autoencoder."):]: v for k, v in state_dict.items() if k.startswith("autoencoder.")} \
            or {k: v for k, v in state_dict.items() if k != "_extra_state"}
        try:
            self.mask_autoencoder.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None

    def load_pretrained(self, autoencoder: AutoencoderKL, denoiser: Optional[UNet2DModel] = None) -> None:
        """Stable Diffusion's parts: its encoder starts the image encoder (SDSeg's trainable copy), its
        latent-diffusion UNet (if any, input widened for the image latent) the denoiser."""
        self.image_encoder.encoder.load_state_dict(autoencoder.encoder.state_dict())
        self.image_encoder.quant_conv.load_state_dict(autoencoder.quant_conv.state_dict())
        if denoiser is not None:
            self.denoiser.load_state_dict(denoiser.state_dict())

    # ---- latents
    @torch.no_grad()
    def encode_mask(self, labels: torch.Tensor) -> torch.Tensor:
        encoded = encode_labels(labels, self.num_classes, self._config["ignore_label"])
        return self.mask_autoencoder.encode(encoded).latent_dist.mode() * self.mask_latent_scale

    def decode_mask(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.mask_autoencoder.decode(latents / self.mask_latent_scale).sample
        return decoded_to_scores(decoded, self.num_classes)

    @torch.no_grad()
    def calibrate_mask_latent_scale(self, label_batches: Iterable[torch.Tensor]) -> float:
        """Scale the mask latents to unit variance over the given training masks, the rule behind Stable
        Diffusion's 0.18215 for photographs: the noise schedule assumes unit-variance data, and a mask
        autoencoder fine-tuned or trained from scratch has latents of another spread. Under
        torch.distributed the moments are summed over all ranks, so every rank gets the same scale."""
        moments = torch.zeros(3, dtype=torch.float64, device=self.mask_latent_scale.device)
        for labels in label_batches:
            encoded = encode_labels(labels, self.num_classes, self._config["ignore_label"])
            latents = self.mask_autoencoder.encode(encoded).latent_dist.mode().double()
            moments += torch.stack([latents.sum(), (latents ** 2).sum(), latents.new_tensor(latents.numel())])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
        mean = moments[0] / moments[2]
        std = (moments[1] / moments[2] - mean ** 2).clamp_min(1e-12).sqrt()
        self.mask_latent_scale.fill_(float(1.0 / std))
        return float(self.mask_latent_scale)

    def _clean_latent(self, noisy: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.train_scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)
        return (noisy - (1 - a).sqrt() * noise_pred) / a.sqrt()

    def _latent_weights(self, labels: torch.Tensor, latent_shape) -> Optional[torch.Tensor]:
        """(B, 1, h, w) fraction of labelled pixels under each latent cell; None without an ignore label."""
        valid = self.valid_mask(labels)
        return None if valid is None else nn.functional.adaptive_avg_pool2d(valid, latent_shape[-2:])

    # ---- training
    def losses(self, image: torch.Tensor, target: torch.Tensor, noise: Optional[torch.Tensor] = None,
               timesteps: Optional[torch.Tensor] = None) -> dict:
        z0 = self.encode_mask(target)
        cond = self.image_encoder(image)
        noise = torch.randn_like(z0) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (z0.shape[0],), device=z0.device)
        noisy = self.train_scheduler.add_noise(z0, noise, timesteps)
        noise_pred = self.denoiser(torch.cat([noisy, cond], dim=1), timesteps).sample
        weights = self._latent_weights(target, z0.shape)

        def l1(a, b):
            error = (a.float() - b.float()).abs()
            if weights is None:
                return error.mean()
            return (error * weights).sum() / (weights.sum() * error.shape[1]).clamp_min(1e-6)

        noise_loss = l1(noise_pred, noise)
        latent_loss = l1(self._clean_latent(noisy, noise_pred, timesteps), z0)
        return {"loss": noise_loss + self._config["latent_loss_weight"] * latent_loss,
                "noise_loss": noise_loss.detach(), "latent_loss": latent_loss.detach()}

    # ---- prediction
    def sample_latent(self, cond: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.setting("seed"))  # the same noise every call
        z = torch.randn(cond.shape, generator=generator).to(device=cond.device, dtype=cond.dtype)
        scheduler = self.sampling_scheduler(self.setting("sampler"), self.setting("steps"))
        return denoise(scheduler, lambda z_t, t: self.denoiser(torch.cat([z_t, cond], dim=1), t).sample, z, generator)

    def predict_with_uncertainty(self, image: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(class scores (B, num_classes, H, W), None): one deterministic sample has no spread."""
        return self.decode_mask(self.sample_latent(self.image_encoder(image))), None
