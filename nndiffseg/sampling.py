"""Noise schedules for training, samplers for prediction and the sampling loop, shared by both heads; the
schedulers are diffusers'.

Training uses a 1000-step DDPM schedule: ``linear`` betas 1e-4 -> 0.02 (DDPM, MedSegDiff: the guided head),
``cosine`` (squaredcos_cap_v2), or ``scaled_linear`` 0.00085 -> 0.012 (Stable Diffusion's, which SDSeg keeps:
the latent head). Prediction runs DDPM, DDIM or DPM-Solver++ on the same schedule with fewer steps. Two
sampler settings differ from diffusers' defaults:
- the steps are spread with ``trailing`` spacing, so sampling starts from the last training timestep, the
  only one at which the model has seen (almost) pure noise (Lin et al., WACV 2024), and the last step lands
  on the clean sample (DDIM with ``set_alpha_to_one``). One DDIM step is then exactly SDSeg's single step:
  the clean estimate at t = 999, in closed form;
- ``clip``: the predicted clean sample is clipped to [-clip, clip] at every step, for variables with known
  bounds (the guided head's masks in [-1, 1], MedSegDiff's ``clip_denoised``; DPM-Solver++ gets it through
  dynamic thresholding with that maximum, which reduces to the same clipping). Latents are unbounded: None.
"""
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from nndiffseg.options import Option

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULES = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             "cosine": dict(beta_schedule="squaredcos_cap_v2"),
             "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLERS = ("ddpm", "ddim", "dpmsolver")
# the prediction options of every head that samples
SAMPLING_OPTIONS = (
    Option("steps", "denoising steps of --sampler (latent trainers: one DDIM step is the single step)", type=int),
    Option("sampler", "the sampler", choices=SAMPLERS),
    Option("seed", "seed of the sampling noise (the same seed gives the same output)", type=int,
           flag="--sampling_seed"))


def check_schedule(schedule: str, prediction_type: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{schedule}', choose one of {', '.join(SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type '{prediction_type}', choose one of {', '.join(PREDICTION_TYPES)}")


def check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}', choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"sampling steps must be an integer from 1 to {NUM_TRAIN_TIMESTEPS}, got {steps!r}")


def training_scheduler(schedule: str = "linear", prediction_type: str = "epsilon") -> DDPMScheduler:
    check_schedule(schedule, prediction_type)
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=prediction_type,
                         clip_sample=False, **SCHEDULES[schedule])


def check_start(strength: float, eta: float) -> None:
    """``strength`` in (0, 1]; ``eta`` (DDIM's noise level; the other samplers have their own) in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"the start strength must be in (0, 1] (1: from pure noise), got {strength!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str = "ddim", steps: int = 50,
                       clip: Optional[float] = 1.0, strength: float = 1.0) -> SchedulerMixin:
    """A sampler on ``train_scheduler``'s noise schedule and prediction type, with its timesteps set
    (``denoise`` sets them again: DPM-Solver++ keeps state across steps). ``strength`` < 1 starts part way
    (SDEdit, diffusers' img2img): the grid is laid out for about ``steps / strength`` steps and only its last
    ``steps`` run, from ``start_timestep`` (about strength x 1000)."""
    check_sampler(sampler, steps)
    check_start(strength, 0.0)
    config = train_scheduler.config
    clipping = dict(clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(config, timestep_spacing="trailing", **clipping)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, **clipping)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                            thresholding=clip is not None,
                                                            sample_max_value=clip or 1.0,
                                                            timestep_spacing="trailing", final_sigmas_type="zero")
    scheduler.set_timesteps(max(steps, round(steps / strength)))
    scheduler.nndiffseg_steps = steps
    return scheduler


def start_timestep(scheduler: SchedulerMixin) -> int:
    """The timestep the first step starts from (999 when sampling from pure noise)."""
    return int(scheduler.timesteps[-scheduler.nndiffseg_steps])


def denoise(scheduler: SchedulerMixin, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            x: torch.Tensor, generator: Optional[torch.Generator] = None, eta: float = 0.0) -> torch.Tensor:
    """The reverse process from ``x`` (noised to ``start_timestep(scheduler)``) over the scheduler's steps;
    ``model(x_t, t)`` returns what the scheduler's prediction type names (noise, clean sample or velocity).
    ``eta``: DDIM's noise level (0: deterministic; 1: as DDPM's ancestral steps)."""
    scheduler.set_timesteps(scheduler.num_inference_steps, device=x.device)  # also resets DPM-Solver++'s history
    options = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    timesteps = scheduler.timesteps[-scheduler.nndiffseg_steps:]
    if hasattr(scheduler, "set_begin_index"):  # multistep solvers find their place in the grid by it
        scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
    for t in timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **options).prev_sample
    return x
