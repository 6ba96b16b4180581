"""nnU-Net's predictor for every nndiffseg head. Its sliding window (padding, tile steps, Gaussian weights,
mirroring, fp16 accumulation on the device with the fall-back to the CPU) stitches every field of the head's
``HeadOutput``, stacked as channels of one tensor, as it stitches logits: the class scores are the same numbers
whichever fields are kept, and those nnU-Net's own predictor gives for the head. Folds: the scores are averaged
as nnU-Net averages logits; the uncertainty pools every fold's samples (``PooledSpread``: the spread across folds
adds to the spread within each); the samples are those of every fold. Each sample is stitched as the scores are,
in score space (``probabilities_to_scores``), so one sample fused alone gives the prediction's own label map.
A network that draws no samples (nnU-Net's U-Net, the latent head) gives one per fold, its probabilities, and
no spread of its own: its folds' disagreement is then the sample set and the uncertainty, for stock trainers
too."""
from types import SimpleNamespace

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nndiffseg.head import HeadOutput, draws_samples, probabilities_to_scores
from nndiffseg.inference.pooled_spread import PooledSpread


class StackedFields(nn.Module):
    """The head as nnU-Net's window sees it: (B, C [+ 1 uncertainty] [+ K x C sample scores], *spatial)."""

    def __init__(self, head: nn.Module, uncertainty: bool, samples: bool):
        super().__init__()
        self.head, self.uncertainty, self.samples = head, uncertainty, samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.head.predict(x)
        fields = [output.scores] + ([output.uncertainty[:, None]] if self.uncertainty else []) + \
            ([probabilities_to_scores(output.samples).movedim(0, 1).flatten(1, 2)] if self.samples else [])
        return torch.cat([f.to(output.scores.dtype) for f in fields], 1)


class HeadPredictor(nnUNetPredictor):
    """``predict_head_output`` gives the fields asked for; nnU-Net's own methods give the scores."""
    keep_uncertainty = keep_samples = False
    num_samples = 0  # samples per fold the head returns, when they are kept

    @property
    def head_samples(self) -> bool:
        return draws_samples(type(getattr(self.network, "_orig_mod", self.network)))

    @torch.inference_mode()
    def predict_head_output(self, data: torch.Tensor, uncertainty: bool = False, samples: bool = False) -> HeadOutput:
        """scores (C, *spatial) on the CPU; uncertainty (*spatial) and samples (folds x K, C, *spatial) where
        asked for, else None; of a preprocessed image (channels, *spatial)."""
        self.keep_uncertainty, self.keep_samples = uncertainty, samples
        self.num_samples = 0 if not samples else \
            getattr(self.network, "_orig_mod", self.network).setting("num_samples") if self.head_samples else 1
        self._pooled, self._samples = PooledSpread(), []
        try:
            scores = self.predict_logits_from_preprocessed_data(data)
        finally:
            self.keep_uncertainty = self.keep_samples = False
        return HeadOutput(scores=scores, uncertainty=self._pooled.spread() if uncertainty else None,
                          samples=torch.cat(self._samples) if samples else None)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """One fold: nnU-Net's window over the stacked fields; returns the scores, keeps the other fields."""
        if not (self.keep_uncertainty or self.keep_samples):
            return super().predict_sliding_window_return_logits(input_image)
        if not self.head_samples:  # the fold is one member: its probabilities are its sample
            scores = super().predict_sliding_window_return_logits(input_image)
            probabilities = scores.float().softmax(0).cpu()
            self._pooled.add(probabilities)
            self._samples.append(probabilities[None])
            return scores
        head, label_manager = self.network, self.label_manager
        classes = label_manager.num_segmentation_heads
        sizes = [classes, int(self.keep_uncertainty), self.num_samples * classes]
        # nnU-Net's window predicts self.network into label_manager.num_segmentation_heads channels
        self.network = StackedFields(head, self.keep_uncertainty, self.keep_samples)
        self.label_manager = SimpleNamespace(num_segmentation_heads=sum(sizes))
        try:
            scores, uncertainty, samples = super().predict_sliding_window_return_logits(input_image).split(sizes)
        finally:
            self.network, self.label_manager = head, label_manager
        if self.keep_uncertainty:
            self._pooled.add(scores.float().softmax(0).cpu(), uncertainty[0].float().cpu())
        if self.keep_samples:
            self._samples.append(samples.float().cpu().unflatten(0, (self.num_samples, classes)).softmax(1))
        return scores.clone()
