"""Uncertainty maps of the sampling heads (the guided trainers): class scores and the samples' spread from one
call per tile (``DiffusionHead.predict``), stitched over nnU-Net's sliding window (its tile
steps and Gaussian weighting, from nnunetv2's public helpers), averaged over mirrorings, pooled over folds
(``nndiffseg.inference.pooled_spread``), and written in the image's own geometry."""
import itertools
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.utilities.helpers import dummy_context
from PIL import Image

from nndiffseg.inference.pooled_spread import PooledSpread
from nndiffseg.visualization.overlay import MIN_PANEL_WIDTH, save_overlay

UNCERTAINTY_FOLDER = "uncertainty"
SAMPLES_FOLDER = "samples"  # samples/sample_K/CASE<ending>: each sample folder is a prediction folder of its own


def _tile_prediction(head: torch.nn.Module, tile: torch.Tensor, keep_samples: bool):
    """(scores, spread, samples or None) of one tile: the samples' probabilities (K, B, C, *tile) too when asked."""
    output = head.predict(tile)
    return output.scores, output.uncertainty, output.samples if keep_samples else None


@torch.inference_mode()
def sliding_window_with_uncertainty(head: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                                    step_size: float = 0.5, mirror_axes: Optional[Sequence[int]] = None,
                                    use_gaussian: bool = True, device: torch.device = torch.device("cpu"),
                                    keep_samples: bool = False):
    """(scores (C, *spatial), uncertainty (*spatial), samples (K, C, *spatial) or None) for a preprocessed
    image (channels, *spatial), with 2D patches over a (channels, slices, H, W) image slice by slice, as nnU-Net's
    predictor does. Sample k is stitched from every tile's sample k (weighted and mirrored as the scores)."""
    data, revert = pad_nd_image(image, patch_size, "constant", {"value": 0}, True, None)
    spatial = data.shape[1:]
    tile_grid = spatial[-len(patch_size):]
    steps = compute_steps_for_sliding_window(tile_grid, patch_size, step_size)
    leading = [range(n) for n in spatial[:len(spatial) - len(patch_size)]]
    weight = compute_gaussian(tuple(patch_size), sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                              device=torch.device("cpu")) if use_gaussian else torch.ones(tuple(patch_size))
    axes = [a + 2 for a in (mirror_axes or ())]
    flips = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    scores = uncertainty = samples = None
    hits = torch.zeros(spatial)
    for position in itertools.product(*leading, *steps):
        lead, corner = position[:len(leading)], position[len(leading):]
        where = (*lead, *[slice(c, c + p) for c, p in zip(corner, patch_size)])
        tile = data[(slice(None), *where)][None].to(device)
        tile_scores, tile_spread, tile_samples = _tile_prediction(head, tile, keep_samples)
        for flip in flips:
            flipped_scores, flipped_spread, flipped_samples = _tile_prediction(head, torch.flip(tile, flip),
                                                                               keep_samples)
            tile_scores = tile_scores + torch.flip(flipped_scores, flip)
            tile_spread = tile_spread + torch.flip(flipped_spread, [a - 1 for a in flip])
            if keep_samples:
                tile_samples = tile_samples + torch.flip(flipped_samples, [a + 1 for a in flip])
        tile_scores, tile_spread = tile_scores[0].float().cpu(), tile_spread[0].float().cpu()
        if scores is None:
            scores = torch.zeros((tile_scores.shape[0], *spatial))
            uncertainty = torch.zeros(spatial)
            if keep_samples:
                samples = torch.zeros((tile_samples.shape[0], tile_scores.shape[0], *spatial))
        scores[(slice(None), *where)] += tile_scores / (len(flips) + 1) * weight
        uncertainty[where] += tile_spread / (len(flips) + 1) * weight
        if keep_samples:
            samples[(slice(None), slice(None), *where)] += tile_samples[:, 0].float().cpu() / (len(flips) + 1) * weight
        hits[where] += weight
    scores, uncertainty = scores / hits, uncertainty / hits
    if keep_samples:
        samples = (samples / hits)[(slice(None), slice(None), *revert[1:])]
    return scores[(slice(None), *revert[1:])], uncertainty[tuple(revert[1:])], samples


class UncertaintyPredictor(nnUNetPredictor):
    """nnU-Net's predictor, plus ``predict_logits_and_uncertainty`` for heads that draw samples."""

    @torch.inference_mode()
    def predict_logits_and_uncertainty(self, data: torch.Tensor, keep_samples: bool = False):
        """(scores (C, *spatial), uncertainty (*spatial), samples (folds x K, C, *spatial) or None) of a
        preprocessed image in preprocessed space: the scores are the mean over the folds' models, as nnU-Net
        averages its folds' logits; the uncertainty pools the samples of every fold (``PooledSpread``: the
        spread across folds adds to the spread within each), and the samples are those of every fold."""
        self.network = self.network.to(self.device).eval()
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        scores = None
        pooled = PooledSpread()
        samples = []
        for params in self.list_of_parameters:
            getattr(self.network, "_orig_mod", self.network).load_state_dict(params)
            with torch.autocast(self.device.type) if self.device.type == "cuda" else dummy_context():
                fold_scores, fold_uncertainty, fold_samples = sliding_window_with_uncertainty(
                    self.network, data, self.configuration_manager.patch_size, self.tile_step_size, mirror_axes,
                    self.use_gaussian, self.device, keep_samples)
            scores = fold_scores if scores is None else scores + fold_scores
            pooled.add(fold_scores.softmax(0), fold_uncertainty)
            if keep_samples:
                samples.append(fold_samples)
        n = len(self.list_of_parameters)
        return scores / n, pooled.spread().numpy(), torch.cat(samples) if keep_samples else None


# the picture's title per uncertainty measure (GuidedSegmenter's ``uncertainty`` setting)
MEASURE_TITLES = {"spread": "spread of the samples; 0: all agree",
                  "total": "prior's and samples' spread; 0: the prior is sure and all samples agree"}


def export_uncertainty(uncertainty: np.ndarray, properties: dict, configuration_manager, plans_manager,
                       image_files: List[str], output_folder: Path, case: str, measure: str = "spread") -> None:
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
    label_file = output_folder / f"{case}.png"
    save_uncertainty_map(full, output_folder, case, image_files[0], label_file,
                         f"prediction and uncertainty ({MEASURE_TITLES[measure]})")


def save_uncertainty_map(full: np.ndarray, output_folder: Path, case: str, image_file: Optional[str],
                         label_file: Path, what: str) -> None:
    """``uncertainty/CASE.npz`` (float32 ``uncertainty``, the image's geometry) and, for a 2D PNG image, a
    picture beside it: the image with the predicted contours and the map as a heat panel."""
    folder = output_folder / UNCERTAINTY_FOLDER
    folder.mkdir(exist_ok=True)
    tmp = folder / f".partial_{case}.npz"  # renamed once complete, as the label maps are
    np.savez_compressed(tmp, uncertainty=full.astype(np.float32))
    os.replace(tmp, folder / f"{case}.npz")
    if full.ndim == 3 and full.shape[0] == 1 and image_file is not None and str(image_file).endswith(".png") \
            and os.path.isfile(image_file):
        image = np.array(Image.open(image_file))
        prediction = np.array(Image.open(label_file)) if label_file.is_file() else np.zeros(full.shape[1:], np.uint8)
        save_overlay(folder / f"{case}.png", image, prediction, uncertainty=full[0], title=f"{case}: {what}",
                     min_panel_width=MIN_PANEL_WIDTH)


def export_samples(samples: torch.Tensor, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                   output_folder: Path, case: str) -> None:
    """Each sample's label map in the image's geometry (nnU-Net's export of its probabilities) as
    ``samples/sample_K/CASE<ending>``, written under a temporary name and renamed."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    writer = plans_manager.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    for k, probabilities in enumerate(samples):
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            probabilities.clamp_min(1e-4).log(), plans_manager, configuration_manager, label_manager, properties)
        folder = output_folder / SAMPLES_FOLDER / f"sample_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".partial_{case}{ending}"
        writer.write_seg(segmentation, str(tmp), properties)
        os.replace(tmp, folder / f"{case}{ending}")
