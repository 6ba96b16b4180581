"""The guided iterative diffusion segmenter (GuidedDiff; MedSegDiff's sampling and fusion).

A conditional DDPM over the mask (one-hot over all classes, in [-1, 1]). The denoiser is conditioned on
the image, on a spatial prior (class probabilities from a segmentation network, in nndiffseg the U-Net
nnU-Net planned) and on a semantic prior (CLIP text embeddings of one prompt per class, zero-padded to the
denoiser's text width and saved with the weights, so prediction loads no CLIP).

Training (``forward`` in train mode): t uniform over the 1000 steps, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps;
loss = MSE of the denoiser's output against eps, x0 or v (the prediction type), over the labelled pixels
(nnU-Net's ignore label is left out) + prior_weight x the prior's own loss (nnU-Net's
Dice + CE with deep supervision, set by the trainer). The prior's probabilities reach the denoiser
undetached, as in GuidedDiff, which trains both end to end; a frozen prior (``freeze_prior``) gets neither
its own loss nor the diffusion loss's gradient.
Prediction: the prior and the text condition are computed once per image; K samples run as one batch
through DDPM / DDIM / DPM-Solver++ from seeded noise; the samples are fused (mean, STAPLE, or their mean
averaged with the prior's probabilities). The
uncertainty (``uncertainty``) is their spread, or the total: the prior's own variance added to the
samples' (``fusion.total_uncertainty``).
"""
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from nndiffseg.guided.denoiser import GuidedDenoiser
from nndiffseg.guided.fusion import FUSIONS, UNCERTAINTIES, fuse, uncertainty_map
from nndiffseg.head import DiffusionHead, HeadOutput, probabilities_to_scores, settings_from_signature
from nndiffseg.mask_encoding import encode_labels, mask_to_probabilities
from nndiffseg.options import Option
from nndiffseg.sampling import (
    NUM_TRAIN_TIMESTEPS,
    SAMPLING_OPTIONS,
    check_sampler,
    check_schedule,
    check_start,
    denoise,
    start_timestep,
)


class GuidedSegmenter(DiffusionHead):
    architecture_settings = ("num_classes", "conditioning", "text_dim")
    ignore_for_config = ("prior", "denoiser")
    prediction_options = SAMPLING_OPTIONS + (
        Option("num_samples", "samples per image, fused", type=int),
        Option("fusion", "how the samples are fused (staple: SimpleITK's STAPLE; with_prior: their mean averaged "
                         "with the prior's probabilities)", choices=FUSIONS),
        Option("eta", "DDIM's noise level, 0 (deterministic) to 1 (ancestral, as DDPM)", type=float),
        Option("strength", "start from the prior's mask noised to about STRENGTH x 1000 instead of from pure "
                           "noise (1)", type=float),
        Option("uncertainty", "the uncertainty map: the samples' spread, or total (the prior's own variance added "
                              "to the samples')", choices=UNCERTAINTIES))
    legacy_defaults = {"eta": 0.0, "strength": 1.0, "uncertainty": "spread"}

    # The defaults are nnDiffSegTrainerGuided's recipe; a checkpoint keeps the settings it was trained with.
    # x0 ("sample") prediction: on 3-class toy discs one DDIM-10 sample reached Dice 0.99 / 1.00 after 300
    # iterations with x0 and 0.27 / 0.29 with noise prediction (docs/benchmarks.md, "prediction type"). Sampling
    # (one DDIM step x 3 samples): on the real ISIC sample every stochastic or multi-step sampler lost Dice, and
    # 3 samples are what fits 10x nnU-Net's time; the map adds the prior's variance to the samples' ("total": a
    # better pixel AUROC than the spread alone in four runs), and the samples' mean is averaged with the prior's
    # probabilities ("with_prior": the rule's choice on held-out fold 2, Dice +1.7 points;
    # docs/benchmarks.md, "Guided uncertainty"). prior_weight 10 is GuidedDiff's.
    @settings_from_signature
    def __init__(self, prior: nn.Module, denoiser: GuidedDenoiser, prediction_type: str = "sample",
                 schedule: str = "linear", sampler: str = "ddim", steps: int = 1, num_samples: int = 3,
                 fusion: str = "with_prior", uncertainty: str = "total", seed: int = 0, eta: float = 0.0,
                 strength: float = 1.0, prior_weight: float = 10.0, freeze_prior: bool = False,
                 ignore_label: Optional[int] = None, clip_model: Optional[str] = None,
                 prompts: Optional[Sequence[str]] = None):
        super().__init__()
        self.prior = prior
        self.denoiser = denoiser
        self.register_buffer("text_embeddings", torch.zeros(denoiser.num_classes, denoiser.text_dim))
        self._config.update(num_classes=denoiser.num_classes, conditioning=denoiser.conditioning,
                            text_dim=denoiser.text_dim)

    def check_config(self, config: Mapping) -> None:
        check_schedule(config["schedule"], config["prediction_type"])
        check_sampler(config["sampler"], config["steps"])
        check_start(config["strength"], config["eta"])
        if isinstance(config["num_samples"], bool) or not isinstance(config["num_samples"], int) \
                or config["num_samples"] < 1:
            raise ValueError(f"--num_samples must be at least 1, got {config['num_samples']}")
        if config["fusion"] not in FUSIONS:
            raise ValueError(f"unknown fusion '{config['fusion']}', choose one of {', '.join(FUSIONS)}")
        if config["uncertainty"] not in UNCERTAINTIES:
            raise ValueError(f"unknown uncertainty '{config['uncertainty']}', choose one of {', '.join(UNCERTAINTIES)}")

    def set_inference_options(self, **options) -> None:
        """As the base class; an explicit ``eta`` > 0 needs DDIM (the checkpoint's own eta is simply not used by
        the other samplers: DDPM's steps are ancestral, DPM-Solver++'s deterministic)."""
        sampler = options.get("sampler") or self.setting("sampler")
        eta = options.get("eta")
        if isinstance(eta, (int, float)) and 0 < eta <= 1 and sampler != "ddim":
            raise ValueError(f"eta is DDIM's noise level; the {sampler} sampler takes none (use --sampler ddim)")
        super().set_inference_options(**options)

    # ---- set up by the trainer
    def set_text_embeddings(self, embeddings: torch.Tensor, clip_model: Optional[str] = None,
                            prompts: Optional[Sequence[str]] = None) -> None:
        """(num_classes, D) text features, zero-padded to the denoiser's text width; the padded inputs meet
        weights that never get a gradient, so any CLIP width up to it gives the same network."""
        expected = (self.num_classes, self.denoiser.text_dim)
        if embeddings.ndim != 2 or embeddings.shape[0] != expected[0] or embeddings.shape[1] > expected[1]:
            raise ValueError(f"text embeddings of shape {tuple(embeddings.shape)}; the denoiser takes "
                             f"{expected[0]} classes of at most {expected[1]} features")
        padded = torch.zeros(expected, device=self.text_embeddings.device)
        padded[:, :embeddings.shape[1]] = embeddings.to(padded.device, torch.float32)
        self.text_embeddings.copy_(padded)
        self.register_to_config(clip_model=clip_model, prompts=list(prompts) if prompts is not None else None)

    def load_prior_state(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Weights of a trained segmentation network of the prior's architecture; ValueError if they do not fit."""
        try:
            self.prior.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None

    def freeze_prior(self) -> None:
        """Keep the prior as it is: no gradient, no loss of its own (call before the optimizer is built)."""
        self.prior.requires_grad_(False)
        self.register_to_config(freeze_prior=True)

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
    def losses(self, image: torch.Tensor, target: Union[torch.Tensor, Sequence[torch.Tensor]],
               noise: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None) -> dict:
        """``target``: (B, 1, H, W) integer labels, or nnU-Net's deep-supervision list of them (the first at
        full resolution), which goes as it is to the prior's loss. ``noise`` and ``timesteps`` default to
        fresh draws."""
        labels = target[0] if isinstance(target, (list, tuple)) else target
        x0 = encode_labels(labels, self.num_classes, self._config["ignore_label"]).to(image.dtype)
        prior_output, prior_logits = self._run_prior(image)
        prior_probs = torch.softmax(prior_logits, dim=1)
        frozen = self._config["freeze_prior"]
        if frozen:
            prior_probs = prior_probs.detach()
        noise = torch.randn_like(x0) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), device=x0.device)
        scheduler = self.train_scheduler
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = self.denoiser(noisy, timesteps, image, prior_probs, self.text_embeddings)
        kind = self._config["prediction_type"]
        goal = noise if kind == "epsilon" else x0 if kind == "sample" else scheduler.get_velocity(x0, noise, timesteps)
        squared = (prediction.float() - goal.float()) ** 2
        valid = self.valid_mask(labels)
        if valid is None:
            diffusion_loss = squared.mean()
        else:
            diffusion_loss = (squared * valid).sum() / (valid.sum() * squared.shape[1]).clamp_min(1)
        loss = diffusion_loss
        prior_loss = torch.zeros((), device=image.device)
        if self._nnunet_loss is not None and not frozen:  # the prior's own loss (nnU-Net's), when the trainer set it
            prior_loss = self._nnunet_loss(prior_output, target)
            loss = loss + self._config["prior_weight"] * prior_loss
        return {"loss": loss, "diffusion_loss": diffusion_loss.detach(), "prior_loss": prior_loss.detach()}

    # ---- prediction
    @torch.no_grad()
    def sample(self, image: torch.Tensor, num_samples: Optional[int] = None, sampler: Optional[str] = None,
               steps: Optional[int] = None, seed: Optional[int] = None, eta: Optional[float] = None,
               strength: Optional[float] = None) -> torch.Tensor:
        """(K, B, num_classes, H, W) class probabilities of K samples for each image; the defaults are the
        settings in force. The same seed gives the same samples. ``strength`` < 1 starts from the prior's
        probabilities (as a mask in [-1, 1]) noised to about strength x 1000 instead of from pure noise."""
        return self._sample_with_prior(image, num_samples, sampler, steps, seed, eta, strength)[0]

    @torch.no_grad()
    def _sample_with_prior(self, image: torch.Tensor, num_samples: Optional[int] = None,
                           sampler: Optional[str] = None, steps: Optional[int] = None, seed: Optional[int] = None,
                           eta: Optional[float] = None, strength: Optional[float] = None):
        """(the samples as ``sample`` returns them, the prior's probabilities (B, num_classes, H, W))."""
        num_samples, sampler, steps, eta, strength = (self.setting(k) if v is None else v for k, v in (
            ("num_samples", num_samples), ("sampler", sampler), ("steps", steps), ("eta", eta), ("strength", strength)))
        check_sampler(sampler, steps)
        check_start(strength, eta)
        batch = image.shape[0]
        _, prior_logits = self._run_prior(image)
        prior_probs = torch.softmax(prior_logits, dim=1)
        # the K samples of every image form one batch, sample-major: row k * B + b is sample k of image b
        condition = torch.cat([image, prior_probs], dim=1).repeat(num_samples, 1, 1, 1)
        text = self.denoiser.text_condition(self.text_embeddings, num_samples * batch)
        shape = (num_samples * batch, self.num_classes) + tuple(image.shape[2:])
        x, generator = self.seeded_noise(shape, image, seed)
        scheduler = self.sampling_scheduler(sampler, steps, strength)
        if strength < 1:
            start = torch.full((shape[0],), start_timestep(scheduler), device=image.device)
            x = scheduler.add_noise((2 * prior_probs - 1).repeat(num_samples, 1, 1, 1), x, start)
        x = denoise(scheduler, lambda x_t, t: self.denoiser.predict(x_t, t, condition, text), x, generator, eta)
        return mask_to_probabilities(x).reshape((num_samples, batch) + x.shape[1:]), prior_probs

    def predict(self, image: torch.Tensor) -> HeadOutput:
        """Scores, uncertainty and samples with the settings in force; the scores are the log of the fused
        probabilities (``probabilities_to_scores``)."""
        samples, prior_probs = self._sample_with_prior(image)
        fused = fuse(samples, self.setting("fusion"), prior_probs)
        uncertainty = uncertainty_map(samples, prior_probs, self.setting("uncertainty"))
        return HeadOutput(scores=probabilities_to_scores(fused), uncertainty=uncertainty, samples=samples)

    def validation_labels(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One sample per patch with the configured sampler (K samples would make epochs long)."""
        return self.sample(image, num_samples=1)[0].argmax(1)
