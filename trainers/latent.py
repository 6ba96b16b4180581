"""nnU-Net adapters for the single-step latent diffusion method (SDSeg / SDMC-Seg); the method itself is
``nndiffseg.latent.segmenter.LatentSegmenter`` and ``nndiffseg.latent.mask_autoencoder.MaskAutoencoderHead``.

``nnDiffSegTrainerMaskVAE`` fine-tunes the mask autoencoder on a fold's training masks;
``nnDiffSegTrainerLatent`` trains the image encoder and the denoiser with that autoencoder frozen. The
``_sd`` variants use Stable Diffusion's architecture (its weights load with ``--sd_weights``); the plain
names use the compact architecture, trained from scratch. The variant is part of the trainer name, as
nnU-Net does for trainer variants, because nnU-Net rebuilds a network for prediction from the trainer
class and the plans alone.
"""
import json
import os
from typing import Optional

import numpy as np
import torch
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nndiffseg.checkpoints import read_network_weights
from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.counts import reconstruction_dice
from nndiffseg.latent.autoencoders import (build_autoencoder, build_denoiser, load_pretrained_autoencoder,
                                           load_pretrained_denoiser)
from nndiffseg.latent.mask_autoencoder import MaskAutoencoderHead
from nndiffseg.latent.mask_encoding import mask_channels
from nndiffseg.latent.segmenter import LatentSegmenter
from nndiffseg.trainers.base import nnDiffSegHeadTrainer

DEFAULT_SD_WEIGHTS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LATENT_SCALE_BATCHES = 8


class _LatentTrainerBase(nnDiffSegHeadTrainer):
    preset = "compact"
    # SDSeg fine-tunes SD's pretrained parts at 1e-5; the compact parts start from scratch and learned
    # several times faster at 1e-3 than at 1e-4 in a first CPU trial (toy shapes, AdamW)
    initial_lr_by_preset = {"compact": 1e-3, "sd": 1e-5}
    option_names = ("seed", "sd_weights")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.initial_lr_by_preset[self.preset]
        self.sd_weights = DEFAULT_SD_WEIGHTS if self.preset == "sd" else "random"

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.current_epoch == 0:  # a resumed run (--c) has all weights in its checkpoint already
            self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Pretrained or fine-tuned parts, loaded in place before the first epoch (on every rank alike)."""

    def _do_i_compile(self) -> bool:
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

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


class nnDiffSegTrainerMaskVAE(_LatentTrainerBase):
    """Fine-tunes the KL-f8 mask autoencoder on the fold's training masks; validation reports the
    reconstruction Dice per class (nnU-Net's pseudo Dice of decode(encode(mask)))."""
    head_class = MaskAutoencoderHead

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return MaskAutoencoderHead(build_autoencoder(cls.preset, mask_channels(num_output_channels)),
                                   num_output_channels, cls.preset)

    def load_initial_weights(self) -> None:
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            self.module.load_pretrained(pretrained)
            self.print_to_log_file(f"mask autoencoder initialised from {self.sd_weights}")

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Reconstruction Dice per class on the fold's validation cases, whole images, written to
        validation/summary.json."""
        self.network.eval()
        _, val_keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, val_keys)

        def label_maps():
            for key in val_keys:
                seg = torch.from_numpy(np.asarray(dataset.load_case(key)[1][:])).long()
                yield (seg[0] if seg.ndim == 4 else seg).to(self.device)  # 2D cases carry a leading axis of 1

        dice = reconstruction_dice(self.module, label_maps())
        if self.local_rank == 0:
            os.makedirs(os.path.join(self.output_folder, "validation"), exist_ok=True)
            with open(os.path.join(self.output_folder, "validation", "summary.json"), "w") as f:
                json.dump({"reconstruction_dice": dice, "cases": list(val_keys)}, f, indent=2)
        self.print_to_log_file(f"mask autoencoder reconstruction Dice per class: {dice}")


class nnDiffSegTrainerLatent(_LatentTrainerBase):
    """Single-step latent diffusion segmentation; in eval mode the network returns class scores, so
    nnU-Net's sliding window, validation and stock nnUNetv2_predict work unchanged."""
    head_class = LatentSegmenter
    head_settings = dict(schedule="scaled_linear", prediction_type="epsilon", latent_loss_weight=1.0, sampler="ddim",
                         steps=1)
    option_names = ("seed", "sd_weights", "mask_vae")
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
                               build_denoiser(cls.preset), num_output_channels, num_input_channels,
                               preset=cls.preset, **cls.head_settings)

    def _mask_vae_checkpoint(self) -> Optional[str]:
        if self.mask_vae is not None:
            return self.mask_vae
        folder = get_output_folder(self.plans_manager.dataset_name, self.mask_vae_trainer,
                                   self.plans_manager.plans_name, self.configuration_name, self.fold)
        found = os.path.join(folder, "checkpoint_final.pth")
        return found if os.path.isfile(found) else None

    def load_initial_weights(self) -> None:
        head: LatentSegmenter = self.module
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            denoiser = load_pretrained_denoiser(self.sd_weights)
            head.load_pretrained(pretrained, denoiser)
            self.print_to_log_file(f"image encoder{' and denoiser' if denoiser is not None else ''} initialised "
                                   f"from {self.sd_weights}")
        checkpoint = self._mask_vae_checkpoint()
        if checkpoint is not None:
            weights, _ = read_network_weights(checkpoint, "--mask_vae")
            try:
                head.load_mask_autoencoder(weights)
            except ValueError as e:
                raise NnDiffSegError(f"--mask_vae {checkpoint} does not fit this trainer's mask autoencoder (train "
                                     f"{self.mask_vae_trainer} on the same dataset and plans): {e}") from None
            self.print_to_log_file(f"mask autoencoder loaded from {checkpoint}")
        elif pretrained is not None and head.mask_autoencoder.config.in_channels == 3:
            head.load_mask_autoencoder(pretrained.state_dict())
            self.print_to_log_file(f"mask autoencoder: Stable Diffusion's from {self.sd_weights}, not fine-tuned "
                                   f"(SDMC-Seg: mean DSC 0.640 against 0.760 fine-tuned); train "
                                   f"{self.mask_vae_trainer} on this fold first")
        else:
            msg = (f"WARNING: no fine-tuned mask autoencoder for fold {self.fold} (train {self.mask_vae_trainer} "
                   f"first, or pass --mask_vae CHECKPOINT): the frozen mask autoencoder is randomly initialised "
                   f"and the segmentation will be poor")
            self.print_to_log_file(msg, also_print_to_console=True)
        scale = head.calibrate_mask_latent_scale(
            next(self.dataloader_train)["target"].to(self.device) for _ in range(LATENT_SCALE_BATCHES))
        self.print_to_log_file(f"mask latents scaled by {scale:.5f} to unit variance over "
                               f"{LATENT_SCALE_BATCHES} training batches{' per rank' if self.is_ddp else ''}")


class nnDiffSegTrainerMaskVAE_sd(nnDiffSegTrainerMaskVAE):
    preset = "sd"


class nnDiffSegTrainerLatent_sd(nnDiffSegTrainerLatent):
    preset = "sd"
    mask_vae_trainer = "nnDiffSegTrainerMaskVAE_sd"
