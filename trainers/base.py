"""The common base of nndiffseg's trainers: the place where nnU-Net's training loop meets the heads."""
from typing import Optional

import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

import nndiffseg


class nnDiffSegTrainer(nnUNetTrainer):
    """nnU-Net's trainer restricted to 2D configurations, the base every nndiffseg trainer derives from.

    On its own it trains nnU-Net's planned U-Net exactly as ``nnUNetTrainer`` does; the diffusion trainers
    replace the network and the steps. ``__init__`` keeps nnU-Net's signature: nnU-Net saves the init
    arguments from it and rebuilds the trainer from them.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch_size = self.configuration_manager.patch_size
        if len(patch_size) != 2:
            raise RuntimeError(
                f"{self.__class__.__name__} supports 2D configurations only, but configuration "
                f"'{configuration}' has a {len(patch_size)}D patch size {list(patch_size)}. "
                f"Train the '2d' configuration instead (nnDiffSeg_train DATASET 2d FOLD ...).")

    def on_train_start(self) -> None:
        super().on_train_start()
        self.print_to_log_file(f"nndiffseg {nndiffseg.__version__}, trainer {self.__class__.__name__}")

    # ---- shared by the diffusion trainers
    option_names: tuple = ()  # method options nnDiffSeg_train may pass (e.g. --sd_weights)

    def set_options(self, **options) -> None:
        """Options from nnDiffSeg_train; stock nnUNetv2_train uses the defaults."""
        for name, value in options.items():
            if value is None:
                continue
            if name not in self.option_names:
                raise ValueError(f"{self.__class__.__name__} has no option --{name}")
            setattr(self, name, value)

    def _module(self) -> nn.Module:
        return self.network.module if self.is_ddp else self.network

    def _backward(self, loss: torch.Tensor) -> None:
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

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()


def hard_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                mask: Optional[torch.Tensor] = None):
    """nnU-Net's tp/fp/fn per foreground class, from label maps (B, H, W) against (B, 1, H, W) or (B, H, W)."""
    pred = nn.functional.one_hot(prediction.long(), num_classes).movedim(-1, 1)
    ref = target if target.ndim == 4 else target[:, None]
    tp, fp, fn, _ = get_tp_fp_fn_tn(pred, ref, axes=[0, 2, 3], mask=mask)
    return tp[1:].detach().cpu().numpy(), fp[1:].detach().cpu().numpy(), fn[1:].detach().cpu().numpy()
