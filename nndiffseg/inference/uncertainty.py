"""The uncertainty maps and samples of the sampling heads (the guided trainers), as ``HeadPredictor`` stitches
them, written in the image's own geometry into the prediction folder (``prediction_folder``'s layout)."""
import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from PIL import Image

from nndiffseg.files import write_atomically
from nndiffseg.head import probabilities_to_scores
from nndiffseg.inference.prediction_folder import SAMPLES_FOLDER, UNCERTAINTY_KEY, save_array, uncertainty_file
from nndiffseg.visualization.overlay import MIN_PANEL_WIDTH, save_overlay

# the picture's title per uncertainty measure (GuidedSegmenter's ``uncertainty`` setting)
MEASURE_TITLES = {"spread": "spread of the samples; 0: all agree",
                  "total": "prior's and samples' spread; 0: the prior is sure and all samples agree",
                  "folds": "spread of the folds' probabilities; 0: all folds agree"}


def export_uncertainty(uncertainty: np.ndarray, properties: dict, configuration_manager, plans_manager,
                       image_files: List[str], output_folder: Path, case: str, measure: str = "spread") -> None:
    """The uncertainty map back in the image's geometry (nnU-Net's resampling of probabilities, cropping
    reverted), saved by ``save_uncertainty_map``."""
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) \
        else [spacing[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(uncertainty[None], shape, current, spacing)[0]
    full = insert_crop_into_image(np.zeros(properties["shape_before_cropping"], dtype=np.float32),
                                  np.asarray(resampled, dtype=np.float32), properties["bbox_used_for_cropping"])
    full = full.transpose(plans_manager.transpose_backward)
    save_uncertainty_map(full, output_folder, case, image_files[0], output_folder / f"{case}.png",
                         f"prediction and uncertainty ({MEASURE_TITLES[measure]})")


def save_uncertainty_map(full: np.ndarray, output_folder: Path, case: str, image_file: Optional[str],
                         label_file: Path, what: str) -> None:
    """``uncertainty/CASE.npz`` (float32 ``uncertainty``, the image's geometry) and, for a 2D PNG image, a
    picture beside it: the image with the predicted contours and the map as a heat panel."""
    file = uncertainty_file(output_folder, case)
    save_array(file, UNCERTAINTY_KEY, full.astype(np.float32))
    if full.ndim == 3 and full.shape[0] == 1 and image_file is not None and str(image_file).endswith(".png") \
            and os.path.isfile(image_file):
        image = np.array(Image.open(image_file))
        prediction = np.array(Image.open(label_file)) if label_file.is_file() else np.zeros(full.shape[1:], np.uint8)
        save_overlay(file.with_suffix(".png"), image, prediction, uncertainty=full[0], title=f"{case}: {what}",
                     min_panel_width=MIN_PANEL_WIDTH)


def export_samples(samples: torch.Tensor, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                   output_folder: Path, case: str) -> None:
    """Each sample's label map in the image's geometry (nnU-Net's export of its probabilities) as
    ``samples/sample_K/CASE<ending>``."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    writer = plans_manager.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    for k, probabilities in enumerate(samples):
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            probabilities_to_scores(probabilities), plans_manager, configuration_manager, label_manager, properties)
        folder = output_folder / SAMPLES_FOLDER / f"sample_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{case}{ending}",
                         lambda name, seg=segmentation: writer.write_seg(seg, name, properties))
