"""Fine-tuning the mask autoencoder on a dataset's masks (SDMC-Seg: 0.640 -> 0.760 mean DSC).

Loss: L1 reconstruction of the one-hot mask in [-1, 1], cross-entropy of the decoded class scores (the
segmentation is read by argmax over them, so their margins are what matters), and a KL term of weight 1e-6.
This is Stable Diffusion's autoencoder loss with the perceptual and adversarial terms, which suit
photographs rather than masks, replaced by the cross-entropy. Pixels at nnU-Net's ignore label are left out
of the reconstruction and cross-entropy terms.

``segmentation_loss_weight`` > 0 adds a segmentation loss of the decoded class scores (nnU-Net's Dice + CE,
set by the trainer with ``set_nnunet_loss``): Dice weighs each class's border pixels as much as its interior,
where the per-pixel terms are dominated by the easy interior and background.
"""
from typing import Optional

import torch
from diffusers import AutoencoderKL
from torch import nn

from nndiffseg.head import ConfiguredModule, settings_from_signature
from nndiffseg.latent.autoencoders import widen_first_conv
from nndiffseg.mask_encoding import decoded_to_scores, encode_labels, mask_channels


class MaskAutoencoder(ConfiguredModule):
    """The mask autoencoder as nnDiffSegTrainerMaskVAE trains it: ``forward(image, target)`` returns the
    autoencoder's losses on the target (the image is not used) and ``reconstruct`` gives label maps back. It
    segments no images: nnDiffSegTrainerLatent loads its weights into its LatentSegmenter."""
    architecture_settings = ("num_classes", "preset")
    legacy_defaults = dict(segmentation_loss_weight=0.0)  # checkpoints saved before it existed
    legacy_names = ("MaskAutoencoderHead",)
    ignore_for_config = ("autoencoder",)

    # segmentation_loss_weight 1: beside the L1 and CE terms, on the ISIC sample at 64 px it reached reconstruction
    # 0.98 in 425 iterations instead of 550 and 0.9874 on the whole validation masks after 850 instead of 0.9790
    # after 1000 (docs/benchmarks.md, "Mask autoencoder budget")
    @settings_from_signature
    def __init__(self, autoencoder: AutoencoderKL, num_classes: int, preset: Optional[str] = None,
                 kl_weight: float = 1e-6, ignore_label: Optional[int] = None, segmentation_loss_weight: float = 1.0):
        super().__init__()
        self.autoencoder = autoencoder

    def load_pretrained(self, pretrained: AutoencoderKL) -> None:
        """Stable Diffusion's autoencoder (3 channels) into this one: its first convolution widened with zeros
        for more mask channels, its last one replaced by this decoder's when the channel counts differ."""
        pretrained.encoder.conv_in = widen_first_conv(pretrained.encoder.conv_in, self.autoencoder.config.in_channels)
        if pretrained.decoder.conv_out.out_channels != self.autoencoder.decoder.conv_out.out_channels:
            pretrained.decoder.conv_out = self.autoencoder.decoder.conv_out
        self.autoencoder.load_state_dict(pretrained.state_dict())

    def forward(self, image: Optional[torch.Tensor], target: Optional[torch.Tensor] = None) -> dict:
        if target is None:
            raise RuntimeError("nnDiffSegTrainerMaskVAE trains the mask autoencoder of nnDiffSegTrainerLatent; it "
                               "does not segment images. Predict with the nnDiffSegTrainerLatent model.")
        return self.losses(image, target)

    def losses(self, image: Optional[torch.Tensor], labels: torch.Tensor) -> dict:
        num_classes, ignore_label = self.num_classes, self._config["ignore_label"]
        target = encode_labels(labels, mask_channels(num_classes), ignore_label)
        posterior = self.autoencoder.encode(target).latent_dist
        reconstruction = self.autoencoder.decode(posterior.sample()).sample
        scores = decoded_to_scores(reconstruction, num_classes)
        flat = (labels[:, 0] if labels.ndim == 4 else labels).long()
        if ignore_label is None:
            rec_loss = nn.functional.l1_loss(reconstruction, target)
            ce = nn.functional.cross_entropy(scores, flat.clamp_min(0))
        else:
            valid = (flat != ignore_label).unsqueeze(1).float()
            error = (reconstruction - target).abs() * valid
            rec_loss = error.sum() / (valid.sum() * error.shape[1]).clamp_min(1)
            ce = nn.functional.cross_entropy(scores, flat.clamp_min(0).masked_fill(flat == ignore_label, -100),
                                             ignore_index=-100)
            ce = torch.nan_to_num(ce)  # a batch without any labelled pixel
        kl = posterior.kl().mean()
        losses = {"loss": rec_loss + ce + self._config["kl_weight"] * kl, "reconstruction_loss": rec_loss.detach(),
                  "cross_entropy": ce.detach(), "kl": kl.detach()}
        if self._config["segmentation_loss_weight"] > 0:
            seg = self.nnunet_loss("segmentation_loss_weight")(scores, labels if labels.ndim == 4 else labels[:, None])
            losses["loss"] = losses["loss"] + self._config["segmentation_loss_weight"] * seg
            losses["segmentation_loss"] = seg.detach()
        return losses

    @torch.no_grad()
    def reconstruct(self, labels: torch.Tensor) -> torch.Tensor:
        """decode(encode(mask)) as a label map (B, H, W), through the posterior mode as at segmentation time."""
        encoded = encode_labels(labels, mask_channels(self.num_classes), self._config["ignore_label"])
        latents = self.autoencoder.encode(encoded).latent_dist.mode()
        return decoded_to_scores(self.autoencoder.decode(latents).sample, self.num_classes).argmax(1)

    def validation_labels(self, image: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(target)
