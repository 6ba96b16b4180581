"""Noise schedules for training and samplers for prediction, all from diffusers.

Training uses a 1000-step DDPM schedule: linear betas 1e-4 -> 0.02 as in DDPM and MedSegDiff, or the
cosine schedule (squaredcos_cap_v2). Prediction runs DDPM, DDIM or DPM-Solver++ on the same schedule with
fewer steps. Two sampler settings differ from diffusers' defaults, for masks in [-1, 1]:
- the steps are spread with ``trailing`` spacing, so sampling starts from the last training timestep,
  the only one at which the model has seen (almost) pure noise (Lin et al., WACV 2024);
- the predicted clean mask is clipped to [-1, 1] at every step (MedSegDiff's ``clip_denoised``); DPM-Solver++
  gets it through dynamic thresholding with a maximum of 1, which reduces to the same clipping.
"""
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULES = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
             "cosine": dict(beta_schedule="squaredcos_cap_v2")}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLERS = ("ddpm", "ddim", "dpmsolver")


def training_scheduler(schedule: str = "linear", prediction_type: str = "epsilon") -> DDPMScheduler:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{schedule}', choose one of {', '.join(SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type '{prediction_type}', choose one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=prediction_type,
                         clip_sample=False, **SCHEDULES[schedule])


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str = "ddim", steps: int = 50) -> SchedulerMixin:
    """A sampler on ``train_scheduler``'s noise schedule and prediction type, with ``set_timesteps(steps)``
    already called (call it again before reusing the sampler: DPM-Solver++ keeps state across steps)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}', choose one of {', '.join(SAMPLERS)}")
    total = train_scheduler.config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"sampling steps must be an integer from 1 to {total}, got {steps!r}")
    config = train_scheduler.config
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(config, clip_sample=True, timestep_spacing="trailing")
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config, clip_sample=True, timestep_spacing="trailing")
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                            thresholding=True, sample_max_value=1.0,
                                                            timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler
