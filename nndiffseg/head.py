"""The interface every diffusion head shares (diffusers' split: the networks and the schedulers are parts,
the loss and the sampling loop live in the head).

- ``forward(image, target)`` in train mode returns the losses (a dict with ``loss``), so training goes
  through ``forward`` and DistributedDataParallel's hooks see every parameter that is used; in eval mode
  ``forward(image)`` returns class scores (B, C, H, W), what nnU-Net's predictor and validation expect.
- ``predict(image)`` returns one ``HeadOutput``: the class scores, and where the head has them the per-pixel
  uncertainty map and the samples it fused, all from one call.
- The config holds every setting that decides what a checkpoint predicts. As with diffusers'
  ``register_to_config``, the constructor's signature is the one source of the defaults; unlike a diffusers
  model the config travels *inside* the state dict (``get_extra_state``): nnU-Net saves and loads
  ``network.state_dict()`` alone. A checkpoint thus predicts with the settings it was trained with
  (``legacy_defaults`` for those it predates); the settings that fix the architecture must match, or loading
  stops naming them. Prediction options override the config and survive loading further folds' weights.
"""
import functools
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import BaseOutput
from torch import nn

from nndiffseg.options import Option
from nndiffseg.sampling import sampling_scheduler, training_scheduler


@dataclass
class HeadOutput(BaseOutput):
    """What a head predicts for a batch of images (diffusers' output style: fields by name or index).

    scores: (B, C, H, W) class scores; nnU-Net's softmax of them gives the class probabilities.
    uncertainty: (B, H, W) per-pixel uncertainty, None for a head whose prediction is deterministic.
    samples: (K, B, C, H, W) class probabilities of the K samples the scores were fused from, or None.
    """
    scores: torch.Tensor
    uncertainty: Optional[torch.Tensor] = None
    samples: Optional[torch.Tensor] = None


# Probabilities leave a head as their logarithm, so nnU-Net's softmax gives them back; the floor keeps one
# sample's certainty from dominating when nnU-Net averages tiles and mirrorings in score space.
PROBABILITY_FLOOR = 1e-4


def probabilities_to_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """Class scores whose softmax gives ``probabilities`` back (floored at PROBABILITY_FLOOR)."""
    return probabilities.clamp_min(PROBABILITY_FLOOR).log()


def settings_from_signature(init: Callable) -> Callable:
    """diffusers' ``register_to_config`` decorator, small: the constructor's arguments with its signature's
    defaults, less ``ignore_for_config``, become the config, checked once the constructor (which may add derived
    settings) has run."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.register_to_config(**{k: v for k, v in list(bound.arguments.items())[1:]
                                   if k not in self.ignore_for_config})
    return wrapper


class ConfiguredModule(nn.Module):
    """A module whose settings travel inside its state dict, with nnU-Net's loss injected by the trainer."""
    # settings fixed by the architecture the trainer class builds: a checkpoint with other values is refused
    architecture_settings: tuple = ("num_classes",)
    # settings added after checkpoints were first saved, with the values that reproduce those checkpoints
    legacy_defaults: Mapping[str, Any] = {}
    ignore_for_config: tuple = ()  # constructor arguments that are parts, not settings
    legacy_names: tuple = ()  # the class's former names, as checkpoints saved under them hold

    def __init__(self):
        super().__init__()
        self._config: dict = {}
        self.__dict__["_nnunet_loss"] = None  # not a submodule, not saved: nnU-Net's loss is the trainer's

    # ---- config
    @property
    def config(self) -> Mapping[str, Any]:
        """The settings saved with the weights (read-only; change them with ``register_to_config``)."""
        return MappingProxyType(self._config)

    @property
    def num_classes(self) -> int:
        return self._config["num_classes"]

    def register_to_config(self, **settings: Any) -> None:
        """Set settings that are saved with the weights; ValueError for a bad value, before anything is set."""
        self.check_config({**self._config, **settings})
        self._config.update(settings)

    def check_config(self, config: Mapping[str, Any]) -> None:
        """ValueError when a setting has a value the module cannot use."""

    def get_extra_state(self) -> dict:
        return {"head": type(self).__name__, "config": dict(self._config)}

    def set_extra_state(self, state: dict) -> None:
        config = {**self.legacy_defaults, **state["config"]}
        different = [f"{k}={config.get(k)!r} (this build: {self._config.get(k)!r})"
                     for k in self.architecture_settings if config.get(k) != self._config.get(k)]
        if state.get("head") not in (type(self).__name__, *self.legacy_names) or different:
            raise ValueError(f"the checkpoint holds a {state.get('head')} with "
                             f"{', '.join(different) or 'another architecture'}; it cannot load into this "
                             f"{type(self).__name__}: predict with the trainer class it was trained with")
        self.check_config(config)
        self._config = config

    # ---- what the trainer injects
    def set_nnunet_loss(self, loss: Optional[Callable]) -> None:
        """nnU-Net's segmentation loss, ``loss(output, target)`` (Dice + CE, deep supervision and the ignore
        label included), for the terms of the module's loss that use it."""
        self.__dict__["_nnunet_loss"] = loss

    def nnunet_loss(self, setting: str) -> Callable:
        """The injected loss; RuntimeError naming ``setting`` (the weight that needs it) when none was set."""
        if self._nnunet_loss is None:
            raise RuntimeError(f"{setting} > 0 needs nnU-Net's segmentation loss: call set_nnunet_loss first")
        return self._nnunet_loss

    # ---- nnU-Net's ignore label
    def valid_mask(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, 1, H, W) float mask of the pixels that carry a label, None when no ignore label is set."""
        ignore = self._config.get("ignore_label")
        if ignore is None:
            return None
        labels = labels if labels.ndim == 4 else labels[:, None]
        return (labels != ignore).to(torch.float32)


def draws_samples(head_class: Optional[type]) -> bool:
    """Whether a head class draws samples (it declares the ``num_samples`` prediction option); None (nnU-Net's
    U-Net) draws none."""
    return any(o.name == "num_samples" for o in getattr(head_class, "prediction_options", ()))


class DiffusionHead(ConfiguredModule):
    # what nnDiffSeg_predict may override (--steps, --sampler, ...); a head that declares num_samples draws samples,
    # and its HeadOutput carries them and an uncertainty map (the ``uncertainty`` setting names which)
    prediction_options: Tuple[Option, ...] = ()
    sample_clip: Optional[float] = 1.0  # the clean sample's bound while sampling (sampling.sampling_scheduler)

    def __init__(self):
        super().__init__()
        self._overrides: dict = {}
        self._schedulers: dict = {}

    def setting(self, name: str) -> Any:
        """The value in force: an inference option when one was set, else the checkpoint's config."""
        return self._overrides.get(name, self._config[name])

    def set_inference_options(self, **options: Any) -> None:
        """Prediction-time overrides (None leaves a setting as configured); checked before any is set."""
        options = {k: v for k, v in options.items() if v is not None}
        names = [o.name for o in self.prediction_options]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise ValueError(f"{type(self).__name__} takes no option {', '.join(unknown)} (it takes "
                             f"{', '.join(names) or 'none'})")
        self.check_config({**self._config, **self._overrides, **options})
        self._overrides.update(options)

    # ---- schedulers, built once per setting
    @property
    def train_scheduler(self):
        key = (self._config["schedule"], self._config["prediction_type"])
        if key not in self._schedulers:
            self._schedulers[key] = training_scheduler(*key)
        return self._schedulers[key]

    def sampling_scheduler(self, sampler: str, steps: int, strength: float = 1.0):
        key = (self._config["schedule"], self._config["prediction_type"], sampler, steps, strength)
        if key not in self._schedulers:
            self._schedulers[key] = sampling_scheduler(self.train_scheduler, sampler, steps, self.sample_clip,
                                                       strength)
        return self._schedulers[key]

    def seeded_noise(self, shape: Sequence[int], like: torch.Tensor,
                     seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Generator]:
        """(noise of ``shape`` on ``like``'s device and dtype, the generator that drew it) from ``seed`` (default:
        the seed in force); drawn on the CPU, so the same seed gives the same noise on any device."""
        generator = torch.Generator(device="cpu").manual_seed(self.setting("seed") if seed is None else seed)
        return torch.randn(tuple(shape), generator=generator).to(device=like.device, dtype=like.dtype), generator

    # ---- what every head does
    def forward(self, image: torch.Tensor, target: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
                **loss_options: Any):
        if self.training:
            if target is None:
                raise ValueError(f"{type(self).__name__} in train mode returns its losses and needs the target")
            return self.losses(image, target, **loss_options)
        return self.predict(image).scores

    def losses(self, image: torch.Tensor, target, **options: Any) -> dict:
        raise NotImplementedError

    def predict(self, image: torch.Tensor) -> HeadOutput:
        raise NotImplementedError

    def validation_labels(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, H, W) labels for nnU-Net's pseudo Dice in training (cheaper than a prediction where it can be)."""
        return self.predict(image).scores.argmax(1)
