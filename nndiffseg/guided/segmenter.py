"""The guided iterative diffusion segmenter (GuidedDiff; MedSegDiff's sampling and fusion).

A conditional DDPM over the mask (one-hot over all classes, in [-1, 1]). The denoiser is conditioned on
the image, on a spatial prior (class probabilities from a segmentation network, in nndiffseg the U-Net
nnU-Net planned) and on a semantic prior (CLIP text embeddings of one prompt per class, a buffer saved
with the weights).

Training: t uniform over the 1000 steps, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; loss = MSE of the
denoiser's output against eps, x0 or v (the prediction type) + prior_weight x the prior's own loss
(nnU-Net's Dice + CE in the trainer). The prior's probabilities reach the denoiser undetached, as in
GuidedDiff, which trains both end to end: the diffusion loss also teaches the prior to give the
denoiser useful guidance, while its own loss keeps it a segmenter (``detach_prior=True`` cuts that path,
for comparison).
Prediction: the prior and the text condition are computed once per image; K samples run as one batch
through DDPM / DDIM / DPM-Solver++ from seeded noise; the samples are fused (mean or STAPLE) and their
spread is the uncertainty.
"""
from typing import Callable, Optional

import torch
from torch import nn

from nndiffseg.guided.denoiser import GuidedDenoiser
from nndiffseg.guided.fusion import FUSIONS, fuse, uncertainty
from nndiffseg.guided.mask_encoding import encode_labels, mask_to_probabilities
from nndiffseg.guided.sampling import NUM_TRAIN_TIMESTEPS, sampling_scheduler, training_scheduler

# The fused probabilities leave as their logarithm, so nnU-Net's softmax gives them back; the floor keeps
# one sample's certainty from dominating when nnU-Net averages tiles and mirrorings in score space.
PROBABILITY_FLOOR = 1e-4


class GuidedSegmenter(nn.Module):
    inference_option_names = ("sampler", "steps", "num_samples", "fusion", "seed")

    def __init__(self, prior: nn.Module, denoiser: GuidedDenoiser, text_embeddings: torch.Tensor,
                 schedule: str = "linear", prediction_type: str = "epsilon", sampler: str = "ddim",
                 steps: int = 50, num_samples: int = 5, fusion: str = "mean", seed: int = 0,
                 detach_prior: bool = False):
        super().__init__()
        expected = (denoiser.num_classes, denoiser.text_dim)
        if tuple(text_embeddings.shape) != expected:
            raise ValueError(f"text embeddings of shape {tuple(text_embeddings.shape)}, the denoiser expects "
                             f"{expected} (num_classes, text_dim)")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}', choose one of {', '.join(FUSIONS)}")
        self.prior = prior
        self.denoiser = denoiser
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
        self.num_classes = denoiser.num_classes
        self.schedule, self.prediction_type = schedule, prediction_type
        self.scheduler = training_scheduler(schedule, prediction_type)
        self.sampler, self.steps, self.num_samples = sampler, steps, num_samples
        self.fusion, self.seed, self.detach_prior = fusion, seed, detach_prior
        self._samplers = {}
        self._sampling_scheduler(sampler, steps)  # a bad name or step count fails here, not at prediction
        self.last_uncertainty: Optional[torch.Tensor] = None

    def set_inference_options(self, sampler: Optional[str] = None, steps: Optional[int] = None,
                              num_samples: Optional[int] = None, fusion: Optional[str] = None,
                              seed: Optional[int] = None) -> None:
        """Prediction settings (nnDiffSeg_predict --sampler/--steps/--num_samples/--fusion/--seed); a bad value
        raises ValueError before anything is predicted."""
        sampler = self.sampler if sampler is None else sampler
        steps = self.steps if steps is None else steps
        self._sampling_scheduler(sampler, steps)
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
        if fusion is not None and fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}', choose one of {', '.join(FUSIONS)}")
        self.sampler, self.steps = sampler, steps
        self.num_samples = self.num_samples if num_samples is None else num_samples
        self.fusion = self.fusion if fusion is None else fusion
        self.seed = self.seed if seed is None else seed

    def _sampling_scheduler(self, sampler: str, steps: int):
        key = (sampler, steps)
        if key not in self._samplers:
            self._samplers[key] = sampling_scheduler(self.scheduler, sampler, steps)
        return self._samplers[key]

    def _run_prior(self, image: torch.Tensor):
        """(the prior's output as it is, its full-resolution logits): under deep supervision the output is a
        list whose first element is the full-resolution one."""
        output = self.prior(image)
        logits = output[0] if isinstance(output, (list, tuple)) else output
        if logits.shape[1] != self.num_classes or logits.shape[2:] != image.shape[2:]:
            raise ValueError(f"the prior returned logits of shape {tuple(logits.shape)} for an image of shape "
                             f"{tuple(image.shape)}; expected {self.num_classes} classes at the image's size")
        return output, logits

    # ---- training
    def training_loss(self, image: torch.Tensor, labels, prior_loss_fn: Optional[Callable] = None,
                      prior_weight: float = 10.0) -> dict:
        """``labels``: (B, 1, H, W) integer labels, or nnU-Net's deep-supervision list of them (the first at
        full resolution), which goes as it is to ``prior_loss_fn(prior_output, labels)``."""
        full_labels = labels[0] if isinstance(labels, (list, tuple)) else labels
        x0 = encode_labels(full_labels, self.num_classes).to(image.dtype)
        prior_output, prior_logits = self._run_prior(image)
        prior_probs = torch.softmax(prior_logits, dim=1)
        if self.detach_prior:
            prior_probs = prior_probs.detach()
        noise = torch.randn_like(x0)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        prediction = self.denoiser(noisy, t, image, prior_probs, self.text_embeddings)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = x0
        else:
            target = self.scheduler.get_velocity(x0, noise, t)
        diffusion_loss = nn.functional.mse_loss(prediction, target)
        loss = diffusion_loss
        prior_loss = torch.zeros((), device=image.device)
        if prior_loss_fn is not None:
            prior_loss = prior_loss_fn(prior_output, labels)
            loss = loss + prior_weight * prior_loss
        return {"loss": loss, "diffusion_loss": diffusion_loss.detach(), "prior_loss": prior_loss.detach()}

    # ---- prediction
    @torch.no_grad()
    def sample(self, image: torch.Tensor, num_samples: Optional[int] = None, sampler: Optional[str] = None,
               steps: Optional[int] = None, seed: Optional[int] = None) -> torch.Tensor:
        """(K, B, num_classes, H, W) class probabilities of K samples for each image; the defaults are the
        segmenter's settings. The same seed gives the same samples."""
        num_samples = self.num_samples if num_samples is None else num_samples
        sampler = self.sampler if sampler is None else sampler
        steps = self.steps if steps is None else steps
        seed = self.seed if seed is None else seed
        batch = image.shape[0]
        _, prior_logits = self._run_prior(image)
        # the K samples of every image form one batch, sample-major: row k * B + b is sample k of image b
        condition = torch.cat([image, torch.softmax(prior_logits, dim=1)], dim=1).repeat(num_samples, 1, 1, 1)
        text = self.denoiser.text_condition(self.text_embeddings, num_samples * batch)
        # noise drawn on the CPU: the same seed gives the same samples on any device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (num_samples * batch, self.num_classes) + tuple(image.shape[2:])
        x = torch.randn(shape, generator=generator).to(device=image.device, dtype=image.dtype)
        scheduler = self._sampling_scheduler(sampler, steps)
        scheduler.set_timesteps(steps, device=image.device)  # also resets DPM-Solver++'s history
        for t in scheduler.timesteps:
            x = scheduler.step(self.denoiser.predict(x, t, condition, text), t, x, generator=generator).prev_sample
        return mask_to_probabilities(x).reshape((num_samples, batch) + x.shape[1:])

    def predict_with_uncertainty(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores (B, num_classes, H, W), uncertainty (B, H, W)) with the segmenter's settings; the
        scores are the log of the fused probabilities, floored at PROBABILITY_FLOOR."""
        samples = self.sample(image)
        fused = fuse(samples, self.fusion)
        return fused.clamp_min(PROBABILITY_FLOOR).log(), uncertainty(samples)

    def forward(self, image: torch.Tensor):
        """In eval mode: class scores (B, num_classes, H, W) for nnU-Net's predictor (its softmax gives the
        fused probabilities back); the samples' uncertainty (B, H, W) is kept in ``last_uncertainty``.
        In train mode: the prior's output as it is (a list under deep supervision), which nnU-Net's loss and
        online evaluation understand; training itself goes through ``training_loss``."""
        if self.training:
            return self.prior(image)
        scores, self.last_uncertainty = self.predict_with_uncertainty(image)
        return scores
