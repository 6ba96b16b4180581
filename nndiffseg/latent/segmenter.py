"""The single-step latent diffusion segmenter (SDSeg, MICCAI 2024; SDMC-Seg for several classes).

Training: the mask is encoded by a frozen mask autoencoder into z0; the image by a trainable image encoder
into c; t is uniform over the 1000-step schedule, z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, and the denoiser
sees [z_t, c]. Loss = |eps_hat - eps|_1 + |z0_hat - z0|_1, where z0_hat is the clean latent recovered from
eps_hat (SDSeg's latent estimation loss, weight 1).
Prediction: ONE denoiser call at the last timestep from pure noise, z0_hat recovered in closed form,
decoded by the mask decoder into class scores. ``inference_steps > 1`` runs DDIM instead (for comparison).
"""
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from nndiffseg.latent.mask_encoding import decoded_to_scores, encode_labels

NUM_TRAIN_TIMESTEPS = 1000


def noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's schedule (scaled linear betas 0.00085 -> 0.012, 1000 steps), which SDSeg keeps."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False)


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


class LatentSegmenter(nn.Module):
    inference_option_names = ("steps",)

    def __init__(self, image_autoencoder: AutoencoderKL, mask_autoencoder: AutoencoderKL, denoiser: UNet2DModel,
                 num_classes: int, image_channels: int, inference_steps: int = 1, seed: int = 0):
        super().__init__()
        self.image_encoder = ImageEncoder(image_autoencoder, image_channels)
        self.mask_autoencoder = mask_autoencoder.requires_grad_(False)
        self.denoiser = denoiser
        self.num_classes = num_classes
        self.inference_steps = inference_steps
        self.seed = seed
        self.scheduler = noise_scheduler()
        self.ddim = DDIMScheduler.from_config(self.scheduler.config, set_alpha_to_one=False)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)
        # saved with the weights: calibrate_mask_latent_scale sets it from the training masks
        self.register_buffer("mask_latent_scale", torch.tensor(float(mask_autoencoder.config.scaling_factor)))

    def set_inference_options(self, steps: Optional[int] = None) -> None:
        if steps is not None:
            if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
                raise ValueError(f"--steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
            self.inference_steps = steps

    def train(self, mode: bool = True) -> "LatentSegmenter":
        super().train(mode)
        self.mask_autoencoder.eval()  # frozen: its dropout/norm statistics never switch to training
        return self

    # ---- latents
    @torch.no_grad()
    def encode_mask(self, labels: torch.Tensor) -> torch.Tensor:
        posterior = self.mask_autoencoder.encode(encode_labels(labels, self.num_classes)).latent_dist
        return posterior.mode() * self.mask_latent_scale

    def decode_mask(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.mask_autoencoder.decode(latents / self.mask_latent_scale).sample
        return decoded_to_scores(decoded, self.num_classes)

    @torch.no_grad()
    def calibrate_mask_latent_scale(self, label_batches) -> float:
        """Scale the mask latents to unit variance over the given training masks, the rule behind Stable
        Diffusion's 0.18215 for photographs: the noise schedule assumes unit-variance data, and a mask
        autoencoder fine-tuned or trained from scratch has latents of another spread."""
        latents = torch.cat([self.mask_autoencoder.encode(encode_labels(labels, self.num_classes)).latent_dist.mode()
                             for labels in label_batches])
        self.mask_latent_scale.fill_(1.0 / float(latents.std().clamp_min(1e-6)))
        return float(self.mask_latent_scale)

    def _clean_latent(self, noisy: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (noisy - (1 - a).sqrt() * noise_pred) / a.sqrt()

    # ---- training
    def training_loss(self, image: torch.Tensor, labels: torch.Tensor) -> dict:
        z0 = self.encode_mask(labels)
        cond = self.image_encoder(image)
        noise = torch.randn_like(z0)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (z0.shape[0],), device=z0.device)
        noisy = self.scheduler.add_noise(z0, noise, t)
        noise_pred = self.denoiser(torch.cat([noisy, cond], dim=1), t).sample
        noise_loss = nn.functional.l1_loss(noise_pred, noise)
        latent_loss = nn.functional.l1_loss(self._clean_latent(noisy, noise_pred, t), z0)
        return {"loss": noise_loss + latent_loss, "noise_loss": noise_loss.detach(), "latent_loss": latent_loss.detach()}

    # ---- prediction
    def _initial_noise(self, shape, device, dtype) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)  # same noise for every call
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    def sample_latent(self, cond: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        steps = steps or self.inference_steps
        z = self._initial_noise(cond.shape, cond.device, cond.dtype)
        if steps == 1:
            t = torch.full((cond.shape[0],), NUM_TRAIN_TIMESTEPS - 1, device=cond.device, dtype=torch.long)
            return self._clean_latent(z, self.denoiser(torch.cat([z, cond], dim=1), t).sample, t)
        self.ddim.set_timesteps(steps, device=cond.device)
        for t in self.ddim.timesteps:
            noise_pred = self.denoiser(torch.cat([z, cond], dim=1), t).sample
            z = self.ddim.step(noise_pred, t, z).prev_sample
        return z

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Class scores (B, num_classes, H, W): what nnU-Net's predictor and validation expect."""
        return self.decode_mask(self.sample_latent(self.image_encoder(image)))
