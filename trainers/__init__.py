"""nnU-Net trainer classes of nndiffseg (installed as ``nndiffseg.trainers``).

Every class in ``__all__`` is found by ``nnDiffSeg_train``/``nnDiffSeg_predict`` and, with
``nnUNet_extTrainer`` set as the README says, by stock ``nnUNetv2_train``/``nnUNetv2_predict``.
"""
from nndiffseg.trainers.base import nnDiffSegTrainer
from nndiffseg.trainers.guided import nnDiffSegTrainerGuided, nnDiffSegTrainerGuided_time
from nndiffseg.trainers.latent import (
                                       nnDiffSegTrainerLatent,
                                       nnDiffSegTrainerLatent_fgWeight4,
                                       nnDiffSegTrainerLatent_sd,
                                       nnDiffSegTrainerMaskVAE,
                                       nnDiffSegTrainerMaskVAE_sd,
)
from nndiffseg.trainers.random_rater import nnUNetTrainerRandomRater

__all__ = ["nnDiffSegTrainer", "nnDiffSegTrainerMaskVAE", "nnDiffSegTrainerMaskVAE_sd", "nnDiffSegTrainerLatent",
           "nnDiffSegTrainerLatent_sd", "nnDiffSegTrainerLatent_fgWeight4", "nnDiffSegTrainerGuided",
           "nnDiffSegTrainerGuided_time", "nnUNetTrainerRandomRater"]
