"""The interface every diffusion head shares (diffusers' split: the networks and the schedulers are parts,
the loss and the sampling loop live in the head).

- ``forward(image, target)`` in train mode returns the losses (a dict with ``loss``), so training goes
  through ``forward`` and DistributedDataParallel's hooks see every parameter that is used; in eval mode
  ``forward(image)`` returns class scores (B, C, H, W), what nnU-Net's predictor and validation expect.
- ``predict(image)`` returns one ``HeadOutput``: the class scores, and where the head has them the per-pixel
  uncertainty map and the samples it fused, all from one call.
- The head's config holds every setting that decides what a checkpoint predicts (prediction type, noise
  schedule, sampler defaults, ...). Like diffusers' ``register_to_config``, it is set when the head is
  built; unlike a diffusers model it travels *inside* the state dict (torch's ``get_extra_state``), because
  nnU-Net saves and loads ``network.state_dict()`` and nothing else. Loading a checkpoint therefore restores
  the settings it was trained with, whatever the building code's defaults are now; the settings that fix the
  architecture must match, or loading stops with a message naming them. Prediction options
  (``set_inference_options``) override the config explicitly and survive loading further folds' weights.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from diffusers.utils import BaseOutput
from torch import nn

CONFIG_NAME = "nndiffseg_head.json"


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


class DiffusionHead(nn.Module):
    # settings fixed by the architecture the trainer class builds: a checkpoint with other values is refused
    architecture_settings: tuple = ("num_classes",)
    # settings nnDiffSeg_predict may override (--steps, --sampler, ...)
    inference_option_names: tuple = ()
    has_uncertainty: bool = False  # True for heads whose HeadOutput carries an uncertainty map
    # settings added after checkpoints were first saved, with the values that reproduce those checkpoints
    added_settings: Mapping[str, Any] = {}

    def __init__(self):
        super().__init__()
        self._config: dict = {}
        self._overrides: dict = {}

    # ---- config
    @property
    def config(self) -> Mapping[str, Any]:
        """The settings saved with the weights (read-only; change them with ``register_to_config``)."""
        return MappingProxyType(self._config)

    def register_to_config(self, **settings: Any) -> None:
        """Set settings that are saved with the weights; ValueError for a bad value, before anything is set."""
        self.check_config({**self._config, **settings})
        self._config.update(settings)

    def check_config(self, config: Mapping[str, Any]) -> None:
        """ValueError when a setting has a value the head cannot use."""

    def setting(self, name: str) -> Any:
        """The value in force: an inference option when one was set, else the checkpoint's config."""
        return self._overrides.get(name, self._config[name])

    def set_inference_options(self, **options: Any) -> None:
        """Prediction-time overrides (None leaves a setting as configured); checked before any is set."""
        options = {k: v for k, v in options.items() if v is not None}
        unknown = [k for k in options if k not in self.inference_option_names]
        if unknown:
            raise ValueError(f"{type(self).__name__} takes no option {', '.join(unknown)} (it takes "
                             f"{', '.join(self.inference_option_names) or 'none'})")
        self.check_config({**self._config, **self._overrides, **options})
        self._overrides.update(options)

    def get_extra_state(self) -> dict:
        return {"head": type(self).__name__, "config": dict(self._config)}

    def set_extra_state(self, state: dict) -> None:
        config = {**self.added_settings, **state["config"]}
        different = [f"{k}={config.get(k)!r} (this build: {self._config.get(k)!r})"
                     for k in self.architecture_settings if config.get(k) != self._config.get(k)]
        if state.get("head") != type(self).__name__ or different:
            raise ValueError(f"the checkpoint holds a {state.get('head')} with "
                             f"{', '.join(different) or 'another architecture'}; it cannot load into this "
                             f"{type(self).__name__}: predict with the trainer class it was trained with")
        self.check_config(config)
        self._config = config

    def save_config(self, folder: Union[str, Path]) -> Path:
        """The config as JSON (diffusers' ``save_config`` layout), for people and tools to read."""
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps({"_class_name": type(self).__name__, **self._config}, indent=2))
        return path

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
        """(B, H, W) labels for nnU-Net's pseudo Dice during training (cheaper than a full prediction
        where the head allows)."""
        return self.predict(image).scores.argmax(1)

    # ---- nnU-Net's ignore label
    def valid_mask(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, 1, H, W) float mask of the pixels that carry a label, None when no ignore label is set."""
        ignore = self._config.get("ignore_label")
        if ignore is None:
            return None
        labels = labels if labels.ndim == 4 else labels[:, None]
        return (labels != ignore).to(torch.float32)
