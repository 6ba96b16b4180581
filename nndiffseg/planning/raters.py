"""Multi-rater datasets: every rater's mask, preprocessed exactly like the case's label, for training on the readers.

A raw dataset with ``"num_raters": R`` in dataset.json keeps, beside ``labelsTr/<case><ending>`` (the raters'
majority vote, what stock nnU-Net trains on), each rater's mask as ``ratersTr/<case>_raterNN<ending>``
(NN = 01..R). Preprocessing writes ``<case>_raters.npy`` (R, 1 | Z, Y, X) beside nnU-Net's data: the masks
through nnU-Net's own preprocessor (same transpose, crop and resampling as the label, outside-crop marked -1),
stored as ``.npy``, which nnU-Net's dataset classes neither list as cases nor mistake for their own files.
"""
import copy
from pathlib import Path

import numpy as np

from nndiffseg.errors import NnDiffSegError

RATERS_FOLDER = {"Tr": "ratersTr", "Ts": "ratersTs"}
RATERS_SUFFIX = "_raters.npy"


def num_raters(dataset_json: dict) -> int:
    """How many raters each case of the dataset has; 0 for an ordinary single-label dataset."""
    return int(dataset_json.get("num_raters", 0))


def rater_file_name(case: str, rater: int, file_ending: str) -> str:
    """The raw file of rater ``rater`` (1-based) of ``case``."""
    return f"{case}_rater{rater:02d}{file_ending}"


def rater_files(raw_dataset: Path, case: str, dataset_json: dict, part: str = "Tr") -> list[Path]:
    """The case's rater masks in the raw dataset, each checked to exist."""
    folder = raw_dataset / RATERS_FOLDER[part]
    files = [folder / rater_file_name(case, r, dataset_json["file_ending"])
             for r in range(1, num_raters(dataset_json) + 1)]
    for file in files:
        if not file.is_file():
            raise NnDiffSegError(f"missing rater mask {file}: dataset.json says each case has "
                                 f"{num_raters(dataset_json)} raters (num_raters)")
    return files


def preprocess_raters(raw_dataset: Path, folder: Path, plans: dict, configuration: str, dataset_json: dict) -> None:
    """``<case>_raters.npy`` in the preprocessed ``folder`` for every training case of a multi-rater dataset;
    nothing for a dataset without raters."""
    if not num_raters(dataset_json):
        return
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from tqdm import tqdm

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    reader = plans_manager.image_reader_writer_class()
    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    for case, files in tqdm(sorted(cases.items()), desc="raters", unit="case"):
        data, properties = reader.read_images(files["images"])
        masks = []
        for rater in rater_files(raw_dataset, case, dataset_json):
            seg, _ = reader.read_seg(str(rater))
            _, seg, _ = preprocessor.run_case_npy(data, seg, copy.deepcopy(properties), plans_manager,
                                                  configuration_manager, dataset_json)
            masks.append(seg.astype(np.int8))
        np.save(folder / f"{case}{RATERS_SUFFIX}", np.stack(masks))
