"""The one place that finds trainer classes and checks method options, for training and prediction alike.

A trainer declares the options ``nnDiffSeg_train`` may pass it (``option_names``, e.g. ``--sd_weights``) and,
through its head, the prediction options ``nnDiffSeg_predict`` may override (``inference_option_names``, e.g.
``--steps``); any other trainer refuses them before anything is written.
"""
from typing import Type

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

import nndiffseg.trainers
from nndiffseg.errors import NnDiffSegError
from nndiffseg.ext_trainer import register_ext_trainer_dir

TRAIN, PREDICT = "train", "predict"


def find_trainer_class(name: str) -> Type[nnUNetTrainer]:
    """nndiffseg.trainers first, then nnunetv2 (and any nnUNet_extTrainer folders)."""
    cls = getattr(nndiffseg.trainers, name, None)
    if cls is not None:
        return cls
    register_ext_trainer_dir()
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise NnDiffSegError(f"trainer '{name}' not found in nndiffseg.trainers ({', '.join(nndiffseg.trainers.__all__)}) "
                             f"nor in nnunetv2.training.nnUNetTrainer (e.g. nnUNetTrainer)") from None


def accepted_options(trainer_class: type, kind: str) -> tuple:
    if kind == TRAIN:
        return tuple(getattr(trainer_class, "option_names", ()))
    head = getattr(trainer_class, "head_class", None)
    return tuple(getattr(head, "inference_option_names", ()))


def check_options(trainer_class: type, options: dict, kind: str) -> dict:
    """The options that were given (not None), or an error naming those ``trainer_class`` does not take."""
    given = {k: v for k, v in options.items() if v is not None}
    accepted = accepted_options(trainer_class, kind)
    unknown = [k for k in given if k not in accepted]
    if unknown:
        takes = f" (it takes {', '.join('--' + k for k in accepted)})" if accepted else ""
        raise NnDiffSegError(f"{trainer_class.__name__} takes no {', '.join('--' + k for k in unknown)}{takes}")
    if kind == TRAIN and hasattr(trainer_class, "check_method_options"):
        trainer_class.check_method_options(given)
    return given
