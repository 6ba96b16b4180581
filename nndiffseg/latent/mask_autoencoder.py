"""Fine-tuning the mask autoencoder on a dataset's masks (SDMC-Seg: 0.640 -> 0.760 mean DSC).

Loss: L1 reconstruction of the one-hot mask in [-1, 1], cross-entropy of the decoded class scores (the
segmentation is read by argmax over them, so their margins are what matters), and a KL term of weight 1e-6.
This is Stable Diffusion's autoencoder loss with the perceptual and adversarial terms, which suit
photographs rather than masks, replaced by the cross-entropy.
"""
import torch
from diffusers import AutoencoderKL

from nndiffseg.latent.mask_encoding import decoded_to_scores, encode_labels

KL_WEIGHT = 1e-6


def mask_autoencoder_loss(autoencoder: AutoencoderKL, labels: torch.Tensor, num_classes: int,
                          kl_weight: float = KL_WEIGHT) -> dict:
    target = encode_labels(labels, num_classes)
    posterior = autoencoder.encode(target).latent_dist
    reconstruction = autoencoder.decode(posterior.sample()).sample
    rec_loss = torch.nn.functional.l1_loss(reconstruction, target)
    ce = torch.nn.functional.cross_entropy(decoded_to_scores(reconstruction, num_classes),
                                           (labels[:, 0] if labels.ndim == 4 else labels).long())
    kl = posterior.kl().mean()
    return {"loss": rec_loss + ce + kl_weight * kl, "reconstruction_loss": rec_loss.detach(),
            "cross_entropy": ce.detach(), "kl": kl.detach()}


@torch.no_grad()
def reconstruct_labels(autoencoder: AutoencoderKL, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """decode(encode(mask)) as a label map (B, H, W), through the posterior mode as at segmentation time."""
    latents = autoencoder.encode(encode_labels(labels, num_classes)).latent_dist.mode()
    return decoded_to_scores(autoencoder.decode(latents).sample, num_classes).argmax(1)
