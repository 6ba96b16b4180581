"""nnU-Net adapters for the single-step latent diffusion method (SDSeg / SDMC-Seg); the method itself is
``nndiffseg.latent.segmenter.LatentSegmenter`` and ``nndiffseg.latent.mask_autoencoder.MaskAutoencoder``.

``nnDiffSegTrainerMaskVAE`` fine-tunes the mask autoencoder on a fold's training masks;
``nnDiffSegTrainerLatent`` trains the image encoder and the denoiser with that autoencoder frozen, and runs
the mask autoencoder stage itself first when the fold has none (one command per fold). The ``_sd`` variants
are SDSeg's recipe: Stable Diffusion's architecture (its weights load with ``--sd_weights``), a KL-f8 image
encoder, latent losses only. The plain names use the compact architecture trained from scratch, with the
image encoder taken from the U-Net nnU-Net planned, the latent factor chosen from the patch and the clean latent
predicted at t = 999 (see ``nndiffseg.latent.segmenter``); ``_fgWeight4`` weighs lesion cells 4 times in the
latent loss, for small lesions. The variant is part of the trainer name, as nnU-Net does
for trainer variants, because nnU-Net rebuilds a network for prediction from the trainer class and the plans
alone.
"""
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nndiffseg.checkpoints import read_network_weights
from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.counts import reconstruction_dice
from nndiffseg.files import write_json
from nndiffseg.latent.autoencoders import (
    LATENT_CHANNELS,
    build_autoencoder,
    build_denoiser,
    latent_downsampling,
    load_pretrained_autoencoder,
    load_pretrained_denoiser,
)
from nndiffseg.latent.mask_autoencoder import MaskAutoencoder
from nndiffseg.latent.segmenter import LatentSegmenter, PlannedImageEncoder
from nndiffseg.mask_encoding import mask_channels
from nndiffseg.options import Option
from nndiffseg.trainers.base import nnDiffSegHeadTrainer

DEFAULT_SD_WEIGHTS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LATENT_SCALE_BATCHES = 8
CONDITIONING_CHANNELS = 32  # the planned image encoder's projection, concatenated with the 4 latent channels
# the mask autoencoder stage that nnDiffSegTrainerLatent runs itself: at most this fraction of its own epochs,
# less when the validation patches reconstruct at RECONSTRUCTION_TARGET per class first. The ISIC sample needed
# ~500-850 stage iterations for 0.99 (docs/benchmarks.md, "Mask autoencoder budget"): half the epochs starved short
# runs (150 iterations: 0.934), while a long run stops early anyway. A stage iteration costs a fifth (64 px) to
# four fifths (128 px) of a latent one, so a short run's stage can take almost as long as the run itself
MASK_STAGE_EPOCH_FRACTION = 1.0
RECONSTRUCTION_TARGET = 0.99


def check_sd_weights(weights: str) -> None:
    """--sd_weights before any work: a folder that exists, or what can only be a hub repo id (NAME or ORG/NAME)."""
    if weights == "random":
        return
    path = Path(weights).expanduser()
    if path.exists() and not path.is_dir():
        raise NnDiffSegError(f"--sd_weights {weights} is a file: give a diffusers folder (with vae/) or repo id")
    if not path.exists() and (weights.startswith(("/", ".", "~")) or weights.count("/") > 1 or os.sep in weights
                              and os.sep != "/"):
        raise NnDiffSegError(f"cannot load Stable Diffusion's autoencoder from --sd_weights {weights}: no such local "
                             f"folder (a hub repo id looks like ORG/NAME, e.g. stable-diffusion-v1-5/"
                             f"stable-diffusion-v1-5); pass an existing folder, a repo id, or --sd_weights random to "
                             f"start from random weights")


class _ReconstructionTargetReached(Exception):
    """Raised at an epoch's end to leave nnU-Net's training loop early."""


def planned_image_encoder(network: nn.Module, downsampling: int, channels: int) -> PlannedImageEncoder:
    """The encoder stages of nnU-Net's planned U-Net down to 1/``downsampling`` of the patch, projected to
    ``channels``; ValueError when no stage ends at that resolution."""
    encoder = network.encoder
    total = np.cumprod([np.broadcast_to(np.asarray(s, dtype=int), (2,)) for s in encoder.strides], axis=0)
    for i, per_axis in enumerate(total):
        if all(per_axis == downsampling):
            return PlannedImageEncoder(encoder.stages[:i + 1], encoder.output_channels[i], channels)
    raise ValueError(f"the planned U-Net (strides {encoder.strides}) has no stage at 1/{downsampling} of the patch")


class _LatentTrainerBase(nnDiffSegHeadTrainer):
    preset = "compact"
    # SDSeg fine-tunes SD's pretrained parts at 1e-5; the compact parts start from scratch and learned
    # several times faster at 1e-3 than at 1e-4 in a first CPU trial (toy shapes, AdamW)
    initial_lr_by_preset = {"compact": 1e-3, "sd": 1e-5}
    training_options = nnDiffSegHeadTrainer.training_options + (
        Option("sd_weights", "latent trainers: Stable Diffusion weights, a diffusers repo id or local folder, or "
                             "'random' "
                             "(default: stable-diffusion-v1-5 for the _sd trainers, random for the others)"),)
    option_checks = {"sd_weights": check_sd_weights}  # before any work
    downsampling: Optional[int] = None  # the autoencoders' factor; None: chosen from the patch (latent_downsampling)

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

    def after_initialize(self) -> None:
        self.module.set_nnunet_loss(self.loss)

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
    """Fine-tunes the mask autoencoder on the fold's training masks, until the validation patches reconstruct at
    RECONSTRUCTION_TARGET per class or the epochs run out; validation reports the reconstruction Dice per class
    (nnU-Net's pseudo Dice of decode(encode(mask)))."""
    is_training_stage = True  # trains a part of nnDiffSegTrainerLatent; it segments no images

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        downsampling = cls.downsampling or latent_downsampling(configuration_manager.patch_size, cls.preset)
        return MaskAutoencoder(build_autoencoder(cls.preset, mask_channels(num_output_channels), downsampling),
                               num_output_channels, cls.preset, **cls.head_settings)

    def load_initial_weights(self) -> None:
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            self.module.load_pretrained(pretrained)
            self.print_to_log_file(f"mask autoencoder initialised from {self.sd_weights}")

    def on_epoch_end(self) -> None:
        """Stops training once every class of the epoch's validation patches reconstructs at
        RECONSTRUCTION_TARGET (nnU-Net's pseudo Dice here is the reconstruction's; under DDP it is gathered over
        all ranks, so they stop together)."""
        dice = [d for d in self.logger.get_value("dice_per_class_or_region", step=-1) if not np.isnan(d)]
        super().on_epoch_end()
        if self.current_epoch < self.num_epochs and dice and min(dice) >= RECONSTRUCTION_TARGET:
            self.print_to_log_file(f"validation patches reconstructed at Dice >= {RECONSTRUCTION_TARGET} for every "
                                   f"class: stopping after {self.current_epoch} of {self.num_epochs} epochs",
                                   also_print_to_console=True)
            raise _ReconstructionTargetReached

    def run_training(self) -> None:
        try:
            super().run_training()
        except _ReconstructionTargetReached:
            self.on_train_end()

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
            write_json(os.path.join(self.output_folder, "validation", "summary.json"),
                       {"reconstruction_dice": dice, "cases": list(val_keys)})
        self.print_to_log_file(f"mask autoencoder reconstruction Dice per class: {dice}")


class nnDiffSegTrainerLatent(_LatentTrainerBase):
    """Single-step latent diffusion segmentation; in eval mode the network returns class scores, so
    nnU-Net's sliding window, validation and stock nnUNetv2_predict work unchanged."""
    head_class = LatentSegmenter
    # the clean latent predicted at the one timestep prediction uses, latent L1 only: on the ISIC sample at 128 px
    # (12 x 25 iterations) Dice 0.745 against 0.659 with the decoded-mask loss (paired p 0.035, and 1.26 against
    # 1.6-2.5 s per iteration), 0.31 for SDSeg's noise prediction with t uniform (docs/benchmarks.md, "Latent
    # trainer levers"); decoded_loss_weight > 0 adds the decoded-mask loss back
    head_settings = dict(prediction_type="sample", timesteps="inference")
    conditioning = "planned"
    training_options = _LatentTrainerBase.training_options + (
        Option("mask_vae", "nnDiffSegTrainerLatent*: fine-tuned mask autoencoder checkpoint (default: the same "
                           "fold's nnDiffSegTrainerMaskVAE* checkpoint_final.pth, if there is one)"),)
    # the mask autoencoder's channels do not follow the class count, nor its network the planned U-Net's
    checkpoint_options = {"mask_vae": ("labels", "patch size")}
    mask_vae_trainer = nnDiffSegTrainerMaskVAE

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_vae: Optional[str] = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        downsampling = cls.downsampling or latent_downsampling(configuration_manager.patch_size, cls.preset)
        mask_autoencoder = build_autoencoder(cls.preset, mask_channels(num_output_channels), downsampling)
        if cls.conditioning == "planned":
            unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, False)
            image_encoder = planned_image_encoder(unet, downsampling, CONDITIONING_CHANNELS)
            denoiser = build_denoiser(cls.preset, LATENT_CHANNELS + CONDITIONING_CHANNELS)
        else:
            image_channels = 3 if cls.preset == "sd" else num_input_channels  # SD's encoder takes RGB
            image_encoder = build_autoencoder(cls.preset, image_channels, downsampling)
            denoiser = build_denoiser(cls.preset)
        return LatentSegmenter(image_encoder, mask_autoencoder, denoiser, num_output_channels, num_input_channels,
                               preset=cls.preset, **cls.head_settings)

    def _mask_vae_folder(self) -> str:
        return get_output_folder(self.plans_manager.dataset_name, self.mask_vae_trainer.__name__,
                                 self.plans_manager.plans_name, self.configuration_name, self.fold)

    def _mask_vae_checkpoint(self) -> Optional[str]:
        if self.mask_vae is not None:
            return self.mask_vae
        found = os.path.join(self._mask_vae_folder(), "checkpoint_final.pth")
        return found if os.path.isfile(found) else None

    def on_train_start(self) -> None:
        # before this trainer's own initialisation, so the two stages' data loaders never run at once
        if self.current_epoch == 0 and self._mask_vae_checkpoint() is None:
            self.check_labels()  # a dataset this trainer refuses gets no stage either
            self.train_mask_autoencoder_stage()
        super().on_train_start()

    def train_mask_autoencoder_stage(self) -> None:
        """The mask autoencoder stage on this fold, in this process: ``mask_vae_trainer`` for at most
        MASK_STAGE_EPOCH_FRACTION of this run's epochs at its iterations per epoch, into its own fold folder
        (so ``--mask_vae`` and stock tools find it as if trained separately); a stage that was interrupted
        continues from its checkpoint_latest.pth."""
        folder = self._mask_vae_folder()
        continuing = os.path.isfile(os.path.join(folder, "checkpoint_latest.pth"))
        plans = {**self.plans_manager.plans, "continue_training": continuing}
        stage = self.mask_vae_trainer(plans, self.configuration_name, self.fold, self.dataset_json, self.device)
        epochs = max(1, round(MASK_STAGE_EPOCH_FRACTION * self.num_epochs))
        stage.configure_run({k: v for k, v in self.options.items() if k in [o.name for o in stage.training_options]},
                            {"num_epochs": epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                             "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch})
        self.print_to_log_file(f"no fine-tuned mask autoencoder for fold {self.fold}: "
                               f"{'continuing' if continuing else 'running'} the mask autoencoder stage first "
                               f"({self.mask_vae_trainer.__name__}, {stage.num_epochs} epochs x "
                               f"{stage.num_iterations_per_epoch} iterations) in {folder}",
                               also_print_to_console=True)
        if continuing:
            stage.load_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))
        stage.run_training()
        stage.perform_actual_validation()
        self.print_to_log_file(f"mask autoencoder stage done; training {self.__class__.__name__}",
                               also_print_to_console=True)

    def load_initial_weights(self) -> None:
        head: LatentSegmenter = self.module
        pretrained = self._pretrained_autoencoder()
        if pretrained is not None:
            denoiser = load_pretrained_denoiser(self.sd_weights)
            head.load_pretrained(pretrained, denoiser)
            self.print_to_log_file(f"image encoder{' and denoiser' if denoiser is not None else ''} initialised "
                                   f"from {self.sd_weights}")
        checkpoint = self._mask_vae_checkpoint()
        weights, _ = read_network_weights(checkpoint, "--mask_vae")
        try:
            head.load_mask_autoencoder(weights)
        except ValueError as e:
            raise NnDiffSegError(f"--mask_vae {checkpoint} does not fit this trainer's mask autoencoder (train "
                                 f"{self.mask_vae_trainer.__name__} on the same dataset and plans): {e}") from None
        self.print_to_log_file(f"mask autoencoder loaded from {checkpoint}")
        scale = head.calibrate_mask_latent_scale(
            next(self.dataloader_train)["target"].to(self.device) for _ in range(LATENT_SCALE_BATCHES))
        self.print_to_log_file(f"mask latents scaled by {scale:.5f} to unit variance over "
                               f"{LATENT_SCALE_BATCHES} training batches{' per rank' if self.is_ddp else ''}")


class nnDiffSegTrainerMaskVAE_sd(nnDiffSegTrainerMaskVAE):
    preset = "sd"
    head_settings = {"segmentation_loss_weight": 0.0}  # SDSeg's loss


class nnDiffSegTrainerLatent_sd(nnDiffSegTrainerLatent):
    """SDSeg's recipe: Stable Diffusion's KL-f8 autoencoder and latent UNet, a KL-f8 image encoder, and its
    latent losses only (noise L1 + latent estimation L1), t uniform over the schedule."""
    preset = "sd"
    conditioning = "kl"
    head_settings: dict = {}  # the head's defaults are SDSeg's
    mask_vae_trainer = nnDiffSegTrainerMaskVAE_sd


class nnDiffSegTrainerLatent_fgWeight4(nnDiffSegTrainerLatent):
    """For small lesions (a few per cent of the image): latent cells weigh 1 + 3 x their foreground fraction in the
    latent L1, so a cell the model is unsure about leaves the background code sooner. On the 3-class stroke
    fixture it learned the subtle ischemic class within 300 iterations where the default predicted none; on the
    ISIC sample's large lesions it cost 10 Dice points (docs/benchmarks.md)."""
    head_settings = {**nnDiffSegTrainerLatent.head_settings, "foreground_weight": 4.0}
