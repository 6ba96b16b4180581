"""The one place that finds trainer classes and checks method options, for training and prediction alike.

A trainer declares the options ``nnDiffSeg_train`` may pass it (``training_options``, e.g. ``--sd_weights``) and,
through its head, the prediction options ``nnDiffSeg_predict`` may override (``prediction_options``, e.g.
``--steps``); any other trainer refuses them before anything is written. The CLIs build their arguments from
the same declarations (``option_groups``).
"""
from typing import Any, Dict, List, Optional, Tuple, Type

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

import nndiffseg.trainers
from nndiffseg.errors import NnDiffSegError
from nndiffseg.ext_trainer import register_ext_trainer_dir
from nndiffseg.options import Option

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
        raise NnDiffSegError(f"trainer '{name}' not found in nndiffseg.trainers "
                             f"({', '.join(nndiffseg.trainers.__all__)}) "
                             f"nor in nnunetv2.training.nnUNetTrainer (e.g. nnUNetTrainer)") from None


def accepted_options(trainer_class: type, kind: str) -> Tuple[Option, ...]:
    if kind == TRAIN:
        return tuple(getattr(trainer_class, "training_options", ()))
    return tuple(getattr(getattr(trainer_class, "head_class", None), "prediction_options", ()))


def option_groups(kind: str) -> List[Tuple[str, Tuple[Option, ...]]]:
    """(title, options) for a CLI's argument groups, every option of nndiffseg's trainers once: for prediction
    the options every head takes, then one group per head; for training one group."""
    trainers = [getattr(nndiffseg.trainers, name) for name in nndiffseg.trainers.__all__]
    if kind == TRAIN:
        return [("method options (only for the trainers that take them; --c restores the first run's)",
                 tuple({o.name: o for t in trainers for o in accepted_options(t, TRAIN)}.values()))]
    heads: Dict[type, List[str]] = {}
    for t in trainers:
        if accepted_options(t, PREDICT):
            heads.setdefault(t.head_class, []).append(t.__name__)
    shared = [o for o in next(iter(heads)).prediction_options if all(o in h.prediction_options for h in heads)]
    groups = [("diffusion trainers: override the settings saved in the checkpoint for this run (refused by trainers "
               "that have no such setting)", tuple(shared))]
    for head, names in heads.items():
        own = tuple(o for o in head.prediction_options if o not in shared)
        if own:
            groups.append((f"{head.__name__} ({', '.join(names)})", own))
    return groups


def add_option_groups(parser: Any, kind: str, default: Optional[str] = None) -> List[str]:
    """``option_groups(kind)`` as argument groups of a CLI's argparse parser, each help ending with ``default``
    where given; returns the options' names (None in the namespace for an option not given)."""
    names = []
    for title, options in option_groups(kind):
        group = parser.add_argument_group(title)
        for o in options:
            how = dict(type=o.type, choices=o.choices) if o.const is None else dict(action="store_const", const=o.const)
            note = f" (default: {default})" if default else ""
            group.add_argument(o.cli, dest=o.name, default=None, help=o.help + note, **how)
            names.append(o.name)
    return names


def check_options(trainer_class: type, options: dict, kind: str) -> dict:
    """The options that were given (not None), or an error naming those ``trainer_class`` does not take."""
    given = {k: v for k, v in options.items() if v is not None}
    accepted = accepted_options(trainer_class, kind)
    flags = {o.name: o.cli for _, group in option_groups(kind) for o in group}
    unknown = [flags.get(k, f"--{k}") for k in given if k not in [o.name for o in accepted]]
    if unknown:
        takes = f" (it takes {', '.join(o.cli for o in accepted)})" if accepted else ""
        raise NnDiffSegError(f"{trainer_class.__name__} takes no {', '.join(unknown)}{takes}")
    if kind == TRAIN and hasattr(trainer_class, "check_method_options"):
        trainer_class.check_method_options(given)
    return given
