"""nnU-Net adapters for the single-step latent diffusion method (SDSeg / SDMC-Seg).

``nnDiffSegTrainerMaskVAE`` fine-tunes the mask autoencoder on a fold's training masks;
``nnDiffSegTrainerLatent`` trains the image encoder and the denoiser with that autoencoder frozen. The
``_sd`` variants use Stable Diffusion's architecture (its weights load with ``--sd_weights``); the plain
names use the compact architecture, trained from scratch. The variant is part of the trainer name, as
nnU-Net does for trainer variants, because nnU-Net rebuilds a network for prediction from the trainer
class and the plans alone.
"""
import os
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nndiffseg.errors import NnDiffSegError
from nndiffseg.latent.autoencoders import (build_autoencoder, build_denoiser, load_pretrained_autoencoder,
                                           load_pretrained_denoiser, widen_first_conv)
from nndiffseg.latent.mask_autoencoder import mask_autoencoder_loss, reconstruct_labels
from nndiffseg.latent.mask_encoding import mask_channels
from nndiffseg.latent.segmenter import LatentSegmenter
from nndiffseg.trainers.base import hard_counts, nnDiffSegTrainer

DEFAULT_SD_WEIGHTS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LATENT_SCALE_BATCHES = 8


class _LatentTrainerBase(nnDiffSegTrainer):
    preset = "compact"
    # SDSeg fine-tunes SD's pretrained parts at 1e-5; the compact parts start from scratch and learned
    # several times faster at 1e-3 than at 1e-4 in a first CPU trial (toy shapes, AdamW)
    initial_lr_by_preset = {"compact": 1e-3, "sd": 1e-5}
    option_names = ("sd_weights",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.initial_lr_by_preset[self.preset]
        self.weight_decay = 1e-2
        self.sd_weights = DEFAULT_SD_WEIGHTS if self.preset == "sd" else "random"

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # no deep supervision heads in these networks

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.current_epoch == 0:  # a resumed run (--c) has all weights in its checkpoint already
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Pretrained or fine-tuned parts, loaded in place before the first epoch."""

    def _do_i_compile(self) -> bool:
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _pretrained_autoencoder(self):
        """SD's autoencoder per --sd_weights, or None for 'random'; a clear error when unreachable."""
        if self.sd_weights == "random":
            return None
        try:
            return load_pretrained_autoencoder(self.sd_weights)
        except Exception as e:
            raise NnDiffSegError(
                f"cannot load Stable Diffusion's autoencoder from '{self.sd_weights}' ({type(e).__name__}: {e}). "
                f"Pass --sd_weights with a diffusers repo id or a local folder that holds it, or --sd_weights "
                f"random to start from random weights.") from None


class MaskAutoencoderNetwork(nn.Module):
    """The mask autoencoder as an nnU-Net network. It reconstructs label maps; it cannot segment images."""

    def __init__(self, autoencoder: nn.Module, num_classes: int):
        super().__init__()
        self.autoencoder = autoencoder
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("nnDiffSegTrainerMaskVAE trains the mask autoencoder of nnDiffSegTrainerLatent; it does "
                           "not segment images. Predict with the nnDiffSegTrainerLatent model.")


class nnDiffSegTrainerMaskVAE(_LatentTrainerBase):
    """Fine-tunes the KL-f8 mask autoencoder on the fold's training masks; validation reports the
    reconstruction Dice per class (nnU-Net's pseudo Dice of decode(encode(mask)))."""

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return MaskAutoencoderNetwork(build_autoencoder(cls.preset, mask_channels(num_output_channels)),
                                      num_output_channels)

    def load_initial_weights(self) -> None:
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            autoencoder = self._module().autoencoder
            pretrained.encoder.conv_in = widen_first_conv(pretrained.encoder.conv_in, autoencoder.config.in_channels)
            autoencoder.load_state_dict(_with_decoder_out_channels(pretrained, autoencoder).state_dict())
            self.print_to_log_file(f"mask autoencoder initialised from {self.sd_weights}")

    def train_step(self, batch: dict) -> dict:
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            losses = mask_autoencoder_loss(self._module().autoencoder, target, self.label_manager.num_segmentation_heads)
        self._backward(losses["loss"])
        return {"loss": losses["loss"].detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        target = batch["target"].to(self.device, non_blocking=True)
        num_classes = self.label_manager.num_segmentation_heads
        with torch.no_grad(), self._autocast():
            loss = mask_autoencoder_loss(self._module().autoencoder, target, num_classes)["loss"]
            reconstructed = reconstruct_labels(self._module().autoencoder, target, num_classes)
        tp, fp, fn = hard_counts(reconstructed, target, num_classes)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Reconstruction Dice per class on the fold's validation cases, whole images (patch-free: the
        autoencoder is convolutional), written to validation/summary.json."""
        import json
        self.network.eval()
        _, val_keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        num_classes = self.label_manager.num_segmentation_heads
        tp = fp = fn = 0
        for key in val_keys:
            _, seg, _, _ = dataset.load_case(key)
            seg = torch.from_numpy(np.asarray(seg[:])).long()
            labels = seg[0] if seg.ndim == 4 else seg  # 2D cases carry a leading axis of size 1
            labels = labels.clamp_min(0)  # nnU-Net marks pixels outside the nonzero crop -1; they are background
            labels = _pad_to_multiple(labels.to(self.device), 8)
            with torch.no_grad():
                rec = reconstruct_labels(self._module().autoencoder, labels, num_classes)
            counts = hard_counts(rec, labels, num_classes)
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
        dice = {str(c + 1): float(2 * tp[c] / max(2 * tp[c] + fp[c] + fn[c], 1)) for c in range(num_classes - 1)}
        os.makedirs(os.path.join(self.output_folder, "validation"), exist_ok=True)
        with open(os.path.join(self.output_folder, "validation", "summary.json"), "w") as f:
            json.dump({"reconstruction_dice": dice, "cases": list(val_keys)}, f, indent=2)
        self.print_to_log_file(f"mask autoencoder reconstruction Dice per class: {dice}")


class nnDiffSegTrainerLatent(_LatentTrainerBase):
    """Single-step latent diffusion segmentation; in eval mode the network returns class scores, so
    nnU-Net's sliding window, validation and stock nnUNetv2_predict work unchanged."""
    option_names = ("sd_weights", "mask_vae")
    mask_vae_trainer = "nnDiffSegTrainerMaskVAE"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_vae: Optional[str] = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        image_channels = 3 if cls.preset == "sd" else num_input_channels  # SD's encoder takes RGB
        return LatentSegmenter(build_autoencoder(cls.preset, image_channels),
                               build_autoencoder(cls.preset, mask_channels(num_output_channels)),
                               build_denoiser(cls.preset), num_output_channels, num_input_channels)

    def _mask_vae_checkpoint(self) -> Optional[str]:
        if self.mask_vae is not None:
            if not os.path.isfile(self.mask_vae):
                raise NnDiffSegError(f"--mask_vae {self.mask_vae}: no such checkpoint file")
            return self.mask_vae
        folder = get_output_folder(self.plans_manager.dataset_name, self.mask_vae_trainer,
                                   self.plans_manager.plans_name, self.configuration_name, self.fold)
        found = os.path.join(folder, "checkpoint_final.pth")
        return found if os.path.isfile(found) else None

    def load_initial_weights(self) -> None:
        model: LatentSegmenter = self._module()
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            model.image_encoder.encoder.load_state_dict(pretrained.encoder.state_dict())
            model.image_encoder.quant_conv.load_state_dict(pretrained.quant_conv.state_dict())
            denoiser = load_pretrained_denoiser(self.sd_weights)
            if denoiser is not None:
                model.denoiser.load_state_dict(denoiser.state_dict())
            self.print_to_log_file(f"image encoder{' and denoiser' if denoiser is not None else ''} initialised "
                                   f"from {self.sd_weights}")
        checkpoint = self._mask_vae_checkpoint()
        if checkpoint is not None:
            weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
            model.mask_autoencoder.load_state_dict({k[len("autoencoder."):]: v for k, v in weights.items()})
            self.print_to_log_file(f"mask autoencoder loaded from {checkpoint}")
        elif pretrained is not None and model.mask_autoencoder.config.in_channels == 3:
            model.mask_autoencoder.load_state_dict(pretrained.state_dict())
            self.print_to_log_file(f"mask autoencoder: Stable Diffusion's from {self.sd_weights}, not fine-tuned "
                                   f"(SDMC-Seg: mean DSC 0.640 against 0.760 fine-tuned); train "
                                   f"{self.mask_vae_trainer} on this fold first")
        else:
            msg = (f"WARNING: no fine-tuned mask autoencoder for fold {self.fold} (train {self.mask_vae_trainer} "
                   f"first, or pass --mask_vae CHECKPOINT): the frozen mask autoencoder is randomly initialised "
                   f"and the segmentation will be poor")
            self.print_to_log_file(msg)
            print(msg)
        scale = model.calibrate_mask_latent_scale(
            [next(self.dataloader_train)["target"].to(self.device) for _ in range(LATENT_SCALE_BATCHES)])
        self.print_to_log_file(f"mask latents scaled by {scale:.5f} to unit variance over "
                               f"{LATENT_SCALE_BATCHES} training batches")

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            losses = self._module().training_loss(data, target)
        self._backward(losses["loss"])
        return {"loss": losses["loss"].detach().cpu().numpy()}


class nnDiffSegTrainerMaskVAE_sd(nnDiffSegTrainerMaskVAE):
    preset = "sd"


class nnDiffSegTrainerLatent_sd(nnDiffSegTrainerLatent):
    preset = "sd"
    mask_vae_trainer = "nnDiffSegTrainerMaskVAE_sd"


def _pad_to_multiple(labels: torch.Tensor, multiple: int) -> torch.Tensor:
    """(1, H, W) labels padded with background to edges divisible by ``multiple``."""
    h, w = labels.shape[-2:]
    return nn.functional.pad(labels, (0, -w % multiple, 0, -h % multiple))


def _with_decoder_out_channels(pretrained, target):
    """SD's decoder ends in 3 channels; a mask autoencoder with more gets its extra output channels fresh."""
    if pretrained.decoder.conv_out.out_channels != target.decoder.conv_out.out_channels:
        pretrained.decoder.conv_out = target.decoder.conv_out
    return pretrained
