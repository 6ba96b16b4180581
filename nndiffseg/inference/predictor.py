"""nnU-Net's predictor for every nndiffseg head. Its sliding window (padding, tile steps, Gaussian weights,
mirroring, fp16 accumulation on the device with the fall-back to the CPU) stitches every field of the head's
``HeadOutput``: the fields are stacked as channels of one tensor, which nnU-Net's window stitches as it stitches
logits. The class scores are therefore the same numbers whichever fields are kept, and the same as nnU-Net's own
predictor gives for the head. Folds: the scores are averaged as nnU-Net averages its folds' logits; the
uncertainty pools every fold's samples (``PooledSpread``: the spread across folds adds to the spread within
each); the samples are those of every fold."""
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator, List

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nndiffseg.head import HeadOutput
from nndiffseg.inference.pooled_spread import PooledSpread


class StackedFields(nn.Module):
    """The head, as nnU-Net's window sees it: (B, C [+ 1 uncertainty] [+ K x C samples], *spatial)."""

    def __init__(self, head: nn.Module, uncertainty: bool, samples: bool):
        super().__init__()
        self.head, self.uncertainty, self.samples = head, uncertainty, samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.head.predict(x)
        fields = [output.scores]
        if self.uncertainty:
            fields.append(output.uncertainty[:, None])
        if self.samples:
            fields.append(output.samples.movedim(0, 1).flatten(1, 2))
        return torch.cat([f.to(output.scores.dtype) for f in fields], 1) if len(fields) > 1 else output.scores


class HeadPredictor(nnUNetPredictor):
    """``predict_head_output`` gives the fields asked for; nnU-Net's own methods (``predict_from_files``,
    ``predict_logits_from_preprocessed_data``) give the scores, as for any network."""
    keep_uncertainty = keep_samples = False
    num_samples = 0  # samples per fold the head returns, when they are kept

    @torch.inference_mode()
    def predict_head_output(self, data: torch.Tensor, uncertainty: bool = False, samples: bool = False) -> HeadOutput:
        """scores (C, *spatial) on the CPU; uncertainty (*spatial) and samples (folds x K, C, *spatial) where
        asked for, else None; for a preprocessed image (channels, *spatial)."""
        head = getattr(self.network, "_orig_mod", self.network)
        self.keep_uncertainty, self.keep_samples = uncertainty, samples
        self.num_samples = head.setting("num_samples") if samples else 0
        self._pooled, self._samples = PooledSpread(), []
        try:
            scores = self.predict_logits_from_preprocessed_data(data)
        finally:
            self.keep_uncertainty = self.keep_samples = False
        return HeadOutput(scores=scores, uncertainty=self._pooled.spread() if uncertainty else None,
                          samples=torch.cat(self._samples) if samples else None)

    @contextmanager
    def _stacking(self, channels: int) -> Iterator[None]:
        """nnU-Net's window predicts ``self.network`` into ``label_manager.num_segmentation_heads`` channels."""
        network, label_manager = self.network, self.label_manager
        self.network = StackedFields(network, self.keep_uncertainty, self.keep_samples)
        self.label_manager = SimpleNamespace(num_segmentation_heads=channels)
        try:
            yield
        finally:
            self.network, self.label_manager = network, label_manager

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """One fold: nnU-Net's window over the stacked fields; returns the scores, keeps the other fields."""
        classes = self.label_manager.num_segmentation_heads
        if not (self.keep_uncertainty or self.keep_samples):
            return super().predict_sliding_window_return_logits(input_image)
        with self._stacking(classes + self.keep_uncertainty + self.num_samples * classes):
            stacked = super().predict_sliding_window_return_logits(input_image)
        fields: List[torch.Tensor] = list(stacked.split([classes, int(self.keep_uncertainty),
                                                         self.num_samples * classes]))
        if self.keep_uncertainty:
            self._pooled.add(fields[0].float().softmax(0).cpu(), fields[1][0].float().cpu())
        if self.keep_samples:
            self._samples.append(fields[2].float().cpu().unflatten(0, (self.num_samples, classes)))
        return fields[0].clone()
