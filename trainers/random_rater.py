"""Training on the readers, not on their average: on a multi-rater dataset (``num_raters`` in dataset.json, see
``nndiffseg.planning.raters``) each training sample's mask is one rater's, drawn anew each time the case is loaded,
before augmentation (so image and mask get the same one). A model so trained learns the distribution of readers:
nnU-Net's softmax the frequency with which they mark a pixel, a diffusion head samples that differ where they differ.
Validation stays on the majority vote (labelsTr), and a fold split keeps a case's raters together (they are one case).
"""
from os.path import isfile, join

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nndiffseg.errors import NnDiffSegError
from nndiffseg.planning.raters import RATERS_SUFFIX, num_raters


class _RandomRater:
    def load_case(self, identifier: str):
        data, _, seg_prev, properties = super().load_case(identifier)
        raters = np.load(join(self.source_folder, identifier + RATERS_SUFFIX), mmap_mode="r")
        return data, raters[np.random.randint(len(raters))], seg_prev, properties


class RandomRaterDatasetBlosc2(_RandomRater, nnUNetDatasetBlosc2):
    pass


class RandomRaterDatasetNumpy(_RandomRater, nnUNetDatasetNumpy):
    pass


RANDOM_RATER_DATASET = {nnUNetDatasetBlosc2: RandomRaterDatasetBlosc2, nnUNetDatasetNumpy: RandomRaterDatasetNumpy}


class RandomRaterMixin:
    """Training cases draw a random rater's mask where the dataset has raters; a dataset without trains as before
    (``requires_raters`` refuses it instead)."""
    requires_raters = False

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        raters = num_raters(self.dataset_json)
        if not raters:
            if self.requires_raters:
                raise NnDiffSegError(f"{self.__class__.__name__} trains on random raters, but dataset.json of "
                                     f"{self.plans_manager.dataset_name} has no num_raters; convert the data with "
                                     f"nnDiffSeg_convert_multirater, or train nnUNetTrainer")
            return dataset_tr, dataset_val
        missing = [i for i in dataset_tr.identifiers if not isfile(join(dataset_tr.source_folder, i + RATERS_SUFFIX))]
        if missing:
            raise NnDiffSegError(
                f"{join(dataset_tr.source_folder, missing[0] + RATERS_SUFFIX)} does not exist ({len(missing)} training "
                f"cases lack their raters): preprocess again with nnDiffSeg_plan_and_preprocess -d "
                f"{self.plans_manager.dataset_name}")
        self.print_to_log_file(f"{raters} raters per case: each training sample is one rater's mask, drawn at random")
        dataset_class = RANDOM_RATER_DATASET[type(dataset_tr)]
        return dataset_class(dataset_tr.source_folder, list(dataset_tr.identifiers),
                             dataset_tr.folder_with_segs_from_previous_stage), dataset_val


class nnUNetTrainerRandomRater(RandomRaterMixin, nnUNetTrainer):
    """nnU-Net's trainer, each training sample on a random rater's mask (nnUNetTrainer trains on the majority vote)."""
    requires_raters = True
