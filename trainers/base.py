"""The common base of nndiffseg's trainers: the place where nnU-Net's training loop meets the heads."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

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
