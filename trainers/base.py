"""The common base of nndiffseg's trainers: the place where nnU-Net's training loop meets the heads.

``nnDiffSegTrainer`` is nnU-Net's trainer restricted to 2D configurations, with what every nndiffseg run
shares: method options recorded in the fold folder (so ``--c``, ours or stock ``nnUNetv2_train``, resumes with
the first run's options and run length), an optional seed (a seeded run resumed with ``--c`` ends with the
same weights as an uninterrupted one), and DDP that also runs on the CPU (gloo). ``nnDiffSegHeadTrainer``
adapts the loop to a diffusion head: batch in, ``network(data, target)`` -> losses, loss out.
"""
import json
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

import nndiffseg
from nndiffseg.checkpoints import remove_stale_partials
from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.counts import hard_counts
from nndiffseg.files import write_atomically, write_json
from nndiffseg.options import Option
from nndiffseg.planning.raters import num_raters
from nndiffseg.test_seam import reached
from nndiffseg.trainers.random_rater import RandomRaterMixin

# what a run was started with, in its fold folder: --c restores it
RUN_RECORD = "nndiffseg_run.json"
# nnU-Net runs 250 training and 50 validation iterations per epoch; shortened runs keep that ratio
NNUNET_VAL_TO_TRAIN_ITERS = 50 / 250
RUN_LENGTH = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")


def seed_everything(seed: int, *stream: int) -> None:
    """Python's, numpy's and torch's generators from ``seed`` and the stream (epoch, rank, ...)."""
    state = np.random.SeedSequence([seed, *[s + 1 for s in stream]]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[1]))


def configure_run(trainer: nnUNetTrainer, options: Optional[dict], run_length: Optional[dict],
                  continuing: bool) -> dict:
    """Set a trainer's method options and run length overrides (num_epochs, num_iterations_per_epoch,
    num_val_iterations_per_epoch; None keeps the trainer's) and record both in its fold folder. A continued
    run takes the recorded ones: a method option that differs from the record is refused (the checkpoint
    was made with it), a run length given again replaces the recorded one. Returns the options in force.
    Works for any nnU-Net trainer (a stock one takes no method options)."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    run_length = {k: v for k, v in (run_length or {}).items() if v is not None}
    record_file = Path(trainer.output_folder) / RUN_RECORD
    if continuing and record_file.is_file():
        record = json.loads(record_file.read_text())
        recorded = record.get("options", {})
        changed = [f"--{k} {v} (the run has {recorded.get(k)!r})" for k, v in options.items() if recorded.get(k) != v]
        if changed:
            raise NnDiffSegError(f"--c resumes with the options the run was started with; drop "
                                 f"{', '.join(changed)} or start a new run in another fold folder")
        options = recorded
        run_length = {**record.get("run_length", {}), **run_length}
    if "num_iterations_per_epoch" in run_length and "num_val_iterations_per_epoch" not in run_length:
        run_length["num_val_iterations_per_epoch"] = max(
            1, round(run_length["num_iterations_per_epoch"] * NNUNET_VAL_TO_TRAIN_ITERS))
    for name, value in run_length.items():
        if name not in RUN_LENGTH:
            raise ValueError(f"unknown run length setting {name}")
        setattr(trainer, name, int(value))
    accepted = [o.name for o in getattr(trainer, "training_options", ())]
    for name, value in options.items():
        if name not in accepted:
            raise NnDiffSegError(f"{trainer.__class__.__name__} takes no --{name}")
        setattr(trainer, name, value)
    if trainer.local_rank == 0:  # atomically: other ranks may be reading it
        os.makedirs(trainer.output_folder, exist_ok=True)
        write_json(record_file, {"trainer": trainer.__class__.__name__, "options": options,
                                 "run_length": {k: getattr(trainer, k) for k in RUN_LENGTH}})
    return options


class nnDiffSegTrainer(nnUNetTrainer):
    """nnU-Net's trainer restricted to 2D configurations, the base every nndiffseg trainer derives from.

    On its own it trains nnU-Net's planned U-Net exactly as ``nnUNetTrainer`` does; the diffusion trainers
    replace the network and the steps. ``__init__`` keeps nnU-Net's signature: nnU-Net saves the init
    arguments from it and rebuilds the trainer from them.
    """
    # method options nnDiffSeg_train may pass (see nndiffseg.registry); a variant adds its own to its parent's
    training_options: tuple = (Option("seed", "nndiffseg trainers: seed the network's initialisation and each epoch's "
                                      "batches and noise; a seeded run resumed with --c ends with the same weights "
                                      "as an uninterrupted one (default: unseeded, as nnU-Net)", type=int),)
    head_class: Optional[type] = None  # the diffusion head a trainer builds (None: nnU-Net's U-Net)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        continuing = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch_size = self.configuration_manager.patch_size
        if len(patch_size) != 2:
            raise NnDiffSegError(
                f"{self.__class__.__name__} supports 2D configurations only, but configuration "
                f"'{configuration}' has a {len(patch_size)}D patch size {list(patch_size)}. "
                f"Train the '2d' configuration instead (nnDiffSeg_train DATASET 2d FOLD ...).")
        if self.is_ddp and device.type == "cpu":  # nnU-Net assumes one GPU per rank; gloo runs on the CPU
            self.device, self.grad_scaler = device, None
        self.continuing = continuing
        self.seed: Optional[int] = None
        self.options: dict = {}
        self._run_configured = False
        if self.local_rank == 0:
            remove_stale_partials(self.output_folder)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written under a temporary name and renamed: a kill while writing leaves the
        previous checkpoint intact instead of a truncated one that --c cannot read."""
        write_atomically(filename, super().save_checkpoint, lambda: reached("checkpoint_written"))

    # ---- options and run length, recorded for --c
    def configure_run(self, options: Optional[dict] = None, run_length: Optional[dict] = None) -> None:
        """Method options (already checked against ``training_options``) and run length overrides, recorded in the
        fold folder (see ``configure_run``). Must run before ``initialize``."""
        self.options = configure_run(self, options, run_length, self.continuing)
        self._run_configured = True

    # ---- nnU-Net's initialize, with the network prepared (weights frozen) before compiling and DDP wrapping
    def initialize(self) -> None:
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        if not self._run_configured:  # stock nnUNetv2_train: restore a continued run's record
            self.configure_run()
        if self.seed is not None:
            seed_everything(self.seed, 0, self.local_rank)
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                       self.num_input_channels,
                                                       self.label_manager.num_segmentation_heads,
                                                       self.enable_deep_supervision).to(self.device)
        self.prepare_network(self.network)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
            # buffers (text embeddings, the latent scale) are equal on every rank and never trained: no broadcast
            # at each forward, which would also deadlock the final validation, where ranks predict different
            # numbers of cases
            self.network = DDP(self.network, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                               broadcast_buffers=False)
        self.loss = self._build_loss()
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True
        self.after_initialize()
        self.logger.update_config({"hparas": {
            "initial_lr": self.initial_lr, "weight_decay": self.weight_decay,
            "oversample_foreground_percent": self.oversample_foreground_percent,
            "probabilistic_oversampling": self.probabilistic_oversampling,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch, "num_epochs": self.num_epochs,
            "enable_deep_supervision": self.enable_deep_supervision,
            "batch_size": self.configuration_manager.batch_size, "nndiffseg_options": self.options}})

    def prepare_network(self, network: nn.Module) -> None:
        """Called on the freshly built network, before compiling, the optimizer and DDP wrapping."""

    def after_initialize(self) -> None:
        """Called once the network, optimizer and nnU-Net's loss exist."""

    @property
    def module(self) -> nn.Module:
        """The network without its DDP and torch.compile wrappers."""
        module = self.network.module if isinstance(self.network, DDP) else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    # ---- seeded runs and DDP checks
    def on_train_start(self) -> None:
        if self.seed is not None:
            seed_everything(self.seed, 1, self.local_rank)
        super().on_train_start()
        self.print_to_log_file(f"nndiffseg {nndiffseg.__version__}, trainer {self.__class__.__name__}"
                               f"{', options ' + json.dumps(self.options) if self.options else ''}")

    def on_epoch_start(self) -> None:
        if self.seed is not None:  # each epoch's batches and noise depend on the seed, epoch and rank alone
            seed_everything(self.seed, 2, self.current_epoch, self.local_rank)
        super().on_epoch_start()

    def on_train_end(self) -> None:
        if self.is_ddp:
            self.check_ranks_agree()
        super().on_train_end()

    def check_ranks_agree(self) -> None:
        """Every rank must hold the same parameters and buffers after training (DDP averages the gradients
        of calls through its forward only); a RuntimeError names the tensors that differ."""
        state = {k: v for k, v in self.module.state_dict().items() if isinstance(v, torch.Tensor)}
        keys = list(state)
        fingerprint = torch.stack([v.detach().double().sum() for v in state.values()] +
                                  [v.detach().double().abs().sum() for v in state.values()]).to(self.device)
        everyone = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, fingerprint)
        differ = sorted({keys[i % len(keys)] for other in everyone[1:]
                         for i in torch.nonzero(other.cpu() != everyone[0].cpu()).flatten().tolist()})
        if differ:
            raise RuntimeError(f"DDP: the ranks' weights differ after training: {', '.join(differ[:5])}")
        self.print_to_log_file(f"DDP: parameters and buffers identical on all {dist.get_world_size()} ranks")


class nnDiffSegHeadTrainer(RandomRaterMixin, nnDiffSegTrainer):
    """Adapts nnU-Net's loop to a diffusion head (``nndiffseg.head.DiffusionHead``): the head computes its own
    losses in ``forward`` (train mode), nnU-Net's predictor gets class scores from it (eval mode). On a multi-rater
    dataset each training sample is a random rater's mask (``RandomRaterMixin``)."""
    mirroring_at_prediction = True  # nnDiffSeg_predict's and the final validation's default
    head_settings: dict = {}  # keyword arguments for the head's constructor, where a variant departs from its defaults
    # head settings that replace those on a multi-rater dataset (num_raters in dataset.json), saved with the weights
    multirater_settings: dict = {}
    initial_lr_default = 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.initial_lr_default
        self.weight_decay = 1e-2

    def check_labels(self) -> None:
        if self.label_manager.has_regions:
            raise NnDiffSegError(f"{self.__class__.__name__} does not support region-based training (dataset.json "
                                 f"labels given as lists of values); train nnUNetTrainer for this dataset")

    def prepare_network(self, network: nn.Module) -> None:
        self.check_labels()
        if self.multirater_settings and num_raters(self.dataset_json):
            network.register_to_config(**self.multirater_settings)
            self.print_to_log_file(f"multi-rater dataset: head settings {self.multirater_settings}")
        if self.label_manager.has_ignore_label:
            network.register_to_config(ignore_label=int(self.label_manager.ignore_label))

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # no deep supervision heads, unless the head holds an nnU-Net network (the guided prior)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, target)["loss"]  # through DDP's forward: gradients are averaged
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        data, target = self._to_device(batch)
        head = self.module
        full = target[0] if isinstance(target, list) else target
        with torch.no_grad(), self._autocast():
            loss = head.losses(data, target)["loss"]
            labels = head.validation_labels(data, full)
        ignore = self.label_manager.ignore_label if self.label_manager.has_ignore_label else None
        tp, fp, fn = hard_counts(labels, full, self.label_manager.num_segmentation_heads, ignore)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation; without mirroring where the trainer predicts without it by default
        (nnDiffSeg_predict --enable_tta turns it on for prediction)."""
        axes, network = self.inference_allowed_mirroring_axes, self.network
        if not self.mirroring_at_prediction:
            self.inference_allowed_mirroring_axes = None
        self.network = self.module  # prediction needs no DDP; each rank predicts its own share of the cases
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes, self.network = axes, network

