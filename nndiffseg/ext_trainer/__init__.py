"""A folder for nnU-Net's ``nnUNet_extTrainer`` variable.

nnunetv2 imports every module it finds in an ``nnUNet_extTrainer`` folder as a top-level module. This
folder holds one tiny module that re-exports ``nndiffseg.trainers``, so the class nnunetv2 finds is the
very object ``nndiffseg.trainers.X`` (pointing nnunetv2 at ``trainers/`` itself would import a second
copy of every module). Set it with::

    export nnUNet_extTrainer="$(nnDiffSeg_ext_trainer_dir)"
"""
import os
from pathlib import Path

EXT_TRAINER_DIR = str(Path(__file__).resolve().parent)


def with_ext_trainer_dir(current: str | None) -> str:
    """``current`` (a value of nnUNet_extTrainer, possibly empty) with our folder added first, once."""
    parts = [p for p in (current or "").split(os.pathsep) if p and os.path.abspath(p) != EXT_TRAINER_DIR]
    return os.pathsep.join([EXT_TRAINER_DIR] + parts)


def register_ext_trainer_dir() -> None:
    """Make nnunetv2's trainer lookup in this process (and its children) find our trainers."""
    os.environ["nnUNet_extTrainer"] = with_ext_trainer_dir(os.environ.get("nnUNet_extTrainer"))


def print_ext_trainer_dir_entry() -> None:
    print(EXT_TRAINER_DIR)
