"""The single-step latent diffusion segmenter (SDSeg, MICCAI 2024; SDMC-Seg for several classes).

Training (``forward`` in train mode): the mask is encoded by a frozen mask autoencoder into z0; the image by
a trainable image encoder into c; t is uniform over the 1000-step schedule, z_t = sqrt(a_t) z0 +
sqrt(1 - a_t) eps, and the denoiser sees [z_t, c]. Loss = |eps_hat - eps|_1 + latent_loss_weight x
|z0_hat - z0|_1, where z0_hat is the clean latent recovered from eps_hat (SDSeg's latent estimation loss,
weight 1; with ``prediction_type="sample"`` the denoiser outputs z0_hat and only the second term is left).
With nnU-Net's ignore label, each latent cell is weighted by the fraction of its pixels that carry a label, so
wholly unlabelled cells count for nothing; ``foreground_weight`` w > 1 weighs a cell by 1 + (w - 1) x its
foreground fraction, so that a cell the model is unsure about leaves the background code sooner (under the L1
loss a cell moves to a class's code once its weighted odds pass even).
Prediction: ONE denoiser call at the last timestep from seeded noise, z0_hat in closed form or, with
``prediction_type="sample"``, the output itself (DDIM-1 with trailing spacing is exactly that), decoded by
the mask decoder into class scores. ``steps`` > 1 runs the shared samplers (for comparison).

Additions of nndiffseg, each a setting saved with the weights (SDSeg's recipe is the ``_sd`` trainers'):
- ``conditioning="planned"``: the image encoder is the first stages of the U-Net nnU-Net planned (built by the
  trainer), down to the latent's resolution, with a 1x1 projection, instead of a KL-f8 encoder copy ("kl"),
  so the conditioning network scales with nnU-Net's planning as the guided head's prior does;
- ``latent_downsampling`` 4 or 8, the mask autoencoder's factor (the trainer chooses it from the patch);
- ``decoded_loss_weight`` > 0: a segmentation loss (nnU-Net's Dice + CE, set by the trainer with
  ``set_nnunet_loss``) on the mask decoded from z0_hat through the frozen decoder, so training sees the
  segmentation itself and not only its latent;
- ``timesteps="inference"``: train at the timestep that one-step prediction starts from (t = 999) instead
  of uniformly over the schedule, so all training goes to the one step that prediction uses;
- ``prediction_type="sample"``: the denoiser outputs the clean latent z0_hat itself, and the loss is the latent
  L1 (plus the decoded-mask loss). With SDSeg's noise prediction at t = 999, z0_hat = (z_t - sqrt(1 - a) eps_hat)
  / sqrt(a) multiplies the noise estimate's error by 1 / sqrt(a) = 15 on the scaled-linear schedule, so the
  network must reproduce its noise input to about 1 % before its mask estimate is usable.
"""
import warnings
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from nndiffseg.head import DiffusionHead, HeadOutput, settings_from_signature
from nndiffseg.latent.autoencoders import autoencoder_downsampling
from nndiffseg.mask_encoding import decoded_to_scores, encode_labels, mask_channels
from nndiffseg.sampling import NUM_TRAIN_TIMESTEPS, SAMPLING_OPTIONS, check_sampler, check_schedule, denoise

TIMESTEPS = ("uniform", "inference")
PREDICTION_TYPES = ("epsilon", "sample")


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


class PlannedImageEncoder(nn.Module):
    """Conditioning from a segmentation network's encoder: ``stages`` (the first stages of the U-Net nnU-Net
    planned, down to the latent's resolution, ``features`` channels out) and a 1x1 projection to
    ``channels`` conditioning channels."""

    def __init__(self, stages: nn.Module, features: int, channels: int):
        super().__init__()
        self.stages = stages
        self.project = nn.Conv2d(features, channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(image))


class LatentSegmenter(DiffusionHead):
    architecture_settings = ("num_classes", "image_channels", "preset", "conditioning", "latent_downsampling")
    ignore_for_config = ("image_encoder", "mask_autoencoder", "denoiser")
    prediction_options = SAMPLING_OPTIONS
    # what checkpoints saved before these settings existed were trained with
    legacy_defaults = dict(conditioning="kl", latent_downsampling=8, decoded_loss_weight=0.0, timesteps="uniform",
                           foreground_weight=1.0)
    sample_clip = None  # latents are unbounded

    # the defaults are SDSeg's recipe (nnDiffSegTrainerLatent_sd)
    @settings_from_signature
    def __init__(self, image_encoder: Union[AutoencoderKL, nn.Module], mask_autoencoder: AutoencoderKL,
                 denoiser: UNet2DModel, num_classes: int, image_channels: int, schedule: str = "scaled_linear",
                 prediction_type: str = "epsilon", latent_loss_weight: float = 1.0, sampler: str = "ddim",
                 steps: int = 1, seed: int = 0, ignore_label: Optional[int] = None, preset: Optional[str] = None,
                 decoded_loss_weight: float = 0.0, timesteps: str = "uniform", foreground_weight: float = 1.0):
        """``image_encoder``: a KL autoencoder (its encoder becomes the trainable image encoder, SDSeg's way) or
        any module mapping the image to conditioning features at the latent's resolution (e.g. a
        ``PlannedImageEncoder``)."""
        super().__init__()
        kl = isinstance(image_encoder, AutoencoderKL)
        self.image_encoder = ImageEncoder(image_encoder, image_channels) if kl else image_encoder
        self.mask_autoencoder = mask_autoencoder.requires_grad_(False)
        self.denoiser = denoiser
        # saved with the weights: calibrate_mask_latent_scale sets it from the training masks
        self.register_buffer("mask_latent_scale", torch.tensor(float(mask_autoencoder.config.scaling_factor)))
        self._config.update(conditioning="kl" if kl else "planned",
                            latent_downsampling=autoencoder_downsampling(mask_autoencoder))

    def check_config(self, config: Mapping) -> None:
        check_schedule(config["schedule"], config["prediction_type"])
        if config["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"the latent head predicts the noise (SDSeg's) or the clean latent ('sample'), not "
                             f"{config['prediction_type']!r}")
        check_sampler(config["sampler"], config["steps"])
        if config["timesteps"] not in TIMESTEPS:
            raise ValueError(f"timesteps must be one of {', '.join(TIMESTEPS)}, got {config['timesteps']!r}")
        if config["decoded_loss_weight"] < 0:
            raise ValueError(f"decoded_loss_weight must be >= 0, got {config['decoded_loss_weight']}")
        if config["foreground_weight"] < 1:
            raise ValueError(f"foreground_weight must be >= 1, got {config['foreground_weight']}")

    def set_inference_options(self, **options) -> None:
        """As the base class; warns when a model trained at the last timestep only is asked for several steps."""
        super().set_inference_options(**options)
        if self.setting("steps") > 1 and self._config["timesteps"] == "inference":
            warnings.warn(f"this latent model was trained at the last timestep only (timesteps='inference'): "
                          f"{self.setting('steps')} sampling steps run it at timesteps it never learned; one step "
                          f"is what it was trained for", stacklevel=2)

    def train(self, mode: bool = True) -> "LatentSegmenter":
        super().train(mode)
        self.mask_autoencoder.eval()  # frozen: its dropout/norm statistics never switch to training
        return self

    # ---- set up by the trainer
    def load_mask_autoencoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The fine-tuned mask autoencoder: a MaskAutoencoder's state dict (``autoencoder.*`` keys) or an
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
        encoded = encode_labels(labels, mask_channels(self.num_classes), self._config["ignore_label"])
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
            encoded = encode_labels(labels, mask_channels(self.num_classes), self._config["ignore_label"])
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
        """(B, 1, h, w) weight of each latent cell in the latent L1: the fraction of its pixels that carry a label
        (with an ignore label), times 1 + (foreground_weight - 1) x the fraction that are foreground; None when
        every cell weighs the same."""
        valid = self.valid_mask(labels)
        weights = None if valid is None else nn.functional.adaptive_avg_pool2d(valid, latent_shape[-2:])
        if self._config["foreground_weight"] != 1:
            labels = labels if labels.ndim == 4 else labels[:, None]
            foreground = (labels > 0).float() if valid is None else (labels > 0).float() * valid
            foreground = nn.functional.adaptive_avg_pool2d(foreground, latent_shape[-2:])
            emphasis = 1 + (self._config["foreground_weight"] - 1) * foreground
            weights = emphasis if weights is None else weights * emphasis
        return weights

    # ---- training
    def losses(self, image: torch.Tensor, target: torch.Tensor, noise: Optional[torch.Tensor] = None,
               timesteps: Optional[torch.Tensor] = None) -> dict:
        z0 = self.encode_mask(target)
        cond = self.image_encoder(image)
        noise = torch.randn_like(z0) if noise is None else noise
        if timesteps is None and self._config["timesteps"] == "inference":
            start = int(self.sampling_scheduler(self.setting("sampler"), self.setting("steps")).timesteps[0])
            timesteps = torch.full((z0.shape[0],), start, device=z0.device, dtype=torch.long)
        elif timesteps is None:
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (z0.shape[0],), device=z0.device)
        noisy = self.train_scheduler.add_noise(z0, noise, timesteps)
        prediction = self.denoiser(torch.cat([noisy, cond], dim=1), timesteps).sample
        weights = self._latent_weights(target, z0.shape)

        def l1(a, b):
            error = (a.float() - b.float()).abs()
            if weights is None:
                return error.mean()
            return (error * weights).sum() / (weights.sum() * error.shape[1]).clamp_min(1e-6)

        if self._config["prediction_type"] == "epsilon":
            noise_loss = l1(prediction, noise)
            clean = self._clean_latent(noisy, prediction, timesteps)
            latent_loss = l1(clean, z0)
            losses = {"loss": noise_loss + self._config["latent_loss_weight"] * latent_loss,
                      "noise_loss": noise_loss.detach(), "latent_loss": latent_loss.detach()}
        else:  # the clean latent itself: the latent estimation loss is the whole latent loss
            clean = prediction
            latent_loss = l1(clean, z0)
            losses = {"loss": self._config["latent_loss_weight"] * latent_loss, "latent_loss": latent_loss.detach()}
        if self._config["decoded_loss_weight"] > 0:
            mask_loss = self.nnunet_loss("decoded_loss_weight")(self.decode_mask(clean),
                                                                target if target.ndim == 4 else target[:, None])
            losses["loss"] = losses["loss"] + self._config["decoded_loss_weight"] * mask_loss
            losses["decoded_mask_loss"] = mask_loss.detach()
        return losses

    # ---- prediction
    def sample_latent(self, cond: torch.Tensor) -> torch.Tensor:
        z, generator = self.seeded_noise((cond.shape[0], self.mask_autoencoder.config.latent_channels,
                                          *cond.shape[2:]), cond)  # the same noise every call
        scheduler = self.sampling_scheduler(self.setting("sampler"), self.setting("steps"))
        return denoise(scheduler, lambda z_t, t: self.denoiser(torch.cat([z_t, cond], dim=1), t).sample, z, generator)

    def predict(self, image: torch.Tensor) -> HeadOutput:
        """Class scores only: one deterministic sample has no spread."""
        return HeadOutput(scores=self.decode_mask(self.sample_latent(self.image_encoder(image))))
