"""Trainer variants for benchmarks/guided_uncertainty.py --variants (issue 12), one training choice changed each
against nnDiffSegTrainerGuided. Found by nnU-Net through ``nnUNet_extTrainer`` pointing at this folder (the
benchmark sets it)."""
from nndiffseg.trainers.guided import nnDiffSegTrainerGuided


class nnDiffSegTrainerGuided_v(nnDiffSegTrainerGuided):
    """v prediction instead of the clean mask (x0): on the coin-flip toy its one-step samples split where the
    answer is a coin flip, less cleanly than x0's (benchmarks/guided_toy_doubt.py)."""
    head_settings = {**nnDiffSegTrainerGuided.head_settings, "prediction_type": "v_prediction"}


class nnDiffSegTrainerGuided_tiny(nnDiffSegTrainerGuided):
    """A denoiser with half the channels of the default "small" one at every level: a cheaper iteration and
    cheaper samples, if the Dice allows."""
    denoiser_size = (16, 32, 64, 64)
