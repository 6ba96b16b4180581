"""Trainer variants for benchmarks/latent_levers.py, one lever changed each against nnDiffSegTrainerLatent.
Found by nnU-Net through ``nnUNet_extTrainer`` pointing at this folder (the benchmark sets it)."""
from nndiffseg.trainers.latent import nnDiffSegTrainerLatent, nnDiffSegTrainerMaskVAE


class nnDiffSegTrainerMaskVAE_f8(nnDiffSegTrainerMaskVAE):
    downsampling = 8


# measured in the 128 px levers run while the decoded-mask loss was on by default: each pins it
class nnDiffSegTrainerLatent_decodedLoss(nnDiffSegTrainerLatent):
    """+ nnU-Net's Dice + CE on the mask decoded from the one-step clean-latent estimate (the default before)."""
    head_settings = {**nnDiffSegTrainerLatent.head_settings, "decoded_loss_weight": 1.0}


class nnDiffSegTrainerLatent_epsInferenceT(nnDiffSegTrainerLatent):
    head_settings = {**nnDiffSegTrainerLatent_decodedLoss.head_settings, "prediction_type": "epsilon"}


class nnDiffSegTrainerLatent_x0uniform(nnDiffSegTrainerLatent):
    head_settings = {**nnDiffSegTrainerLatent_decodedLoss.head_settings, "timesteps": "uniform"}


class nnDiffSegTrainerLatent_epsUniform(nnDiffSegTrainerLatent):
    """SDSeg's parametrisation, the default until the levers run at 128 px: noise prediction, t uniform (with
    the decoded-mask loss, as then)."""
    head_settings = {**nnDiffSegTrainerLatent_decodedLoss.head_settings, "prediction_type": "epsilon",
                     "timesteps": "uniform"}


class nnDiffSegTrainerLatent_klEncoder(nnDiffSegTrainerLatent):
    conditioning = "kl"


class nnDiffSegTrainerLatent_f8(nnDiffSegTrainerLatent):
    downsampling = 8
    mask_vae_trainer = "nnDiffSegTrainerMaskVAE_f8"


class nnDiffSegTrainerLatent_before(nnDiffSegTrainerLatent):
    """The compact trainer as it was before these levers: KL-f8 image encoder, f8 latent, latent losses only,
    noise prediction with t uniform."""
    conditioning = "kl"
    downsampling = 8
    mask_vae_trainer = "nnDiffSegTrainerMaskVAE_f8"
    head_settings = {**nnDiffSegTrainerLatent.head_settings, "decoded_loss_weight": 0.0, "prediction_type": "epsilon",
                     "timesteps": "uniform"}


class nnDiffSegTrainerMaskVAE_noDice(nnDiffSegTrainerMaskVAE):
    """The mask autoencoder without nnU-Net's Dice + CE on its decoded class scores (L1, CE and KL only)."""
    head_settings = {**nnDiffSegTrainerMaskVAE.head_settings, "segmentation_loss_weight": 0.0}
