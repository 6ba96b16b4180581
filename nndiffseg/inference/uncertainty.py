"""Uncertainty maps of the sampling networks (the guided trainers), stitched over nnU-Net's sliding window
and written in the image's own geometry."""
import os
from pathlib import Path
from typing import List

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from PIL import Image

from nndiffseg.visualization.overlay import save_overlay

UNCERTAINTY_FOLDER = "uncertainty"


class UncertaintyPredictor(nnUNetPredictor):
    """nnU-Net's predictor that also stitches a diffusion network's per-tile uncertainty (``last_uncertainty``,
    the spread of its samples, from the unmirrored pass) into one map per image, averaged over overlapping
    tiles and over folds. ``start_case`` resets it; ``case_uncertainty`` returns it in preprocessed space."""

    def start_case(self) -> None:
        self._sum = self._hits = None

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        self._tile_sum, self._tile_hits = torch.zeros(data.shape[1:]), torch.zeros(data.shape[1:])
        self._slicers = list(slicers)
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        first = []
        hook = self.network.register_forward_hook(
            lambda module, inputs, output: first.append(module.last_uncertainty) if not first else None)
        try:
            prediction = super()._internal_maybe_mirror_and_predict(x)
        finally:
            hook.remove()
        where = self._slicers.pop(0)[1:]
        self._tile_sum[where] += first[0][0].float().cpu()
        self._tile_hits[where] += 1
        return prediction

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        logits = super().predict_sliding_window_return_logits(input_image)
        _, unpad = pad_nd_image(torch.zeros((1, *input_image.shape[1:])), self.configuration_manager.patch_size,
                                "constant", {"value": 0}, True, None)
        fold_map = (self._tile_sum / self._tile_hits.clamp_min(1))[tuple(unpad[1:])]
        self._sum = fold_map if self._sum is None else self._sum + fold_map
        self._hits = 1 if self._hits is None else self._hits + 1
        return logits

    def case_uncertainty(self) -> np.ndarray:
        return (self._sum / self._hits).numpy()


def export_uncertainty(uncertainty: np.ndarray, properties: dict, configuration_manager, plans_manager,
                       image_files: List[str], output_folder: Path, case: str) -> None:
    """The uncertainty map back in the image's geometry (nnU-Net's resampling of probabilities, cropping
    reverted) as ``uncertainty/CASE.npz`` (float32 ``uncertainty``) and, for 2D images, a PNG beside it:
    the image with the predicted contours and the map as a heat panel."""
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(uncertainty[None], shape, current, spacing)[0]
    full = insert_crop_into_image(np.zeros(properties["shape_before_cropping"], dtype=np.float32),
                                  np.asarray(resampled, dtype=np.float32), properties["bbox_used_for_cropping"])
    full = full.transpose(plans_manager.transpose_backward)
    folder = output_folder / UNCERTAINTY_FOLDER
    folder.mkdir(exist_ok=True)
    tmp = folder / f".partial_{case}.npz"  # renamed once complete, as the label maps are
    np.savez_compressed(tmp, uncertainty=full)
    os.replace(tmp, folder / f"{case}.npz")
    if full.ndim == 3 and full.shape[0] == 1 and image_files[0].endswith(".png"):
        image = np.array(Image.open(image_files[0]))
        label_file = output_folder / f"{case}.png"
        prediction = np.array(Image.open(label_file)) if label_file.is_file() else np.zeros(full.shape[1:], np.uint8)
        save_overlay(folder / f"{case}.png", image, prediction, uncertainty=full[0],
                     title=f"{case}: prediction and uncertainty (spread of the samples)")
