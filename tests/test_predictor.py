"""HeadPredictor: nnU-Net's sliding window stitches every field of a head's HeadOutput, and the class scores (so the
label maps) do not depend on which fields are kept: in process on a toy head, and through nnDiffSeg_predict with
and without --save_uncertainty on a guided model trained for one iteration."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli import planned_toy, run_tool
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from PIL import Image
from torch import nn

from nndiffseg.head import DiffusionHead, HeadOutput
from nndiffseg.inference.predictor import HeadPredictor
from nndiffseg.options import Option

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

PATCH = [16, 16]


class PixelHead(DiffusionHead):
    """A per-pixel head (1x1 convolution), so tiling and mirroring leave each pixel's output as it is: the
    stitched fields must be the head's outputs on the whole image. Uncertainty: |first channel|."""
    prediction_options = (Option("num_samples", "samples per image", type=int),)  # a head that draws samples

    def __init__(self, seed: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        torch.manual_seed(seed)
        nn.init.normal_(self.conv.weight)
        self.register_to_config(num_samples=2)

    def predict(self, image: torch.Tensor) -> HeadOutput:
        scores = self.conv(image)
        return HeadOutput(scores=scores, uncertainty=image[:, 0].abs(),
                          samples=torch.stack([scores.softmax(1), (2 * scores).softmax(1)]))


def make_predictor(predictor_class, folds: int = 2, mirroring: bool = True):
    predictor = predictor_class(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.network = PixelHead(0)
    predictor.list_of_parameters = [PixelHead(seed).state_dict() for seed in range(folds)]
    predictor.configuration_manager = SimpleNamespace(patch_size=PATCH)
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=3)
    predictor.allowed_mirroring_axes = (0, 1)
    return predictor


@pytest.mark.parametrize("shape", [(1, 1, 40, 37), (1, 1, 12, 30)])  # tiles overlapping; padded to the patch
def test_scores_are_nnunets_whichever_fields_are_kept(shape):
    data = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    reference = make_predictor(nnUNetPredictor).predict_logits_from_preprocessed_data(data)
    predictor = make_predictor(HeadPredictor)
    for uncertainty, samples in ((False, False), (True, False), (False, True), (True, True)):
        output = predictor.predict_head_output(data, uncertainty, samples)
        assert torch.equal(output.scores, reference), (uncertainty, samples)  # bit for bit, nnU-Net's float16
        assert (output.uncertainty is None) != uncertainty and (output.samples is None) != samples
    assert predictor.network.__class__ is PixelHead and predictor.label_manager.num_segmentation_heads == 3


def test_every_field_is_stitched_over_tiles_mirrorings_and_folds():
    data = torch.randn((1, 1, 40, 37), generator=torch.Generator().manual_seed(2))
    output = make_predictor(HeadPredictor, folds=1).predict_head_output(data, True, True)
    whole = PixelHead(0).predict(data.transpose(0, 1))  # the head on the whole image, one batch of one
    # nnU-Net accumulates in float16: off by a few % only in the image's corners, where every Gaussian weight is tiny
    inner = (..., slice(2, -2), slice(2, -2))
    close = dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(output.uncertainty[inner], whole.uncertainty[inner], **close)  # one fold: its own
    torch.testing.assert_close(output.samples[inner], whole.samples.transpose(1, 2)[inner], **close)
    two = make_predictor(HeadPredictor, folds=2).predict_head_output(data, True, True)
    assert two.samples.shape == (4, 3, 1, 40, 37)  # folds x samples
    torch.testing.assert_close(two.samples[:2], output.samples)
    assert (two.uncertainty >= output.uncertainty - 2e-2).all()  # the folds' disagreement adds to the spread


# ---------------------------------------------------------------------------------------------- nnDiffSeg_predict

DATASET_ID = 45


@pytest.fixture(scope="module")
def guided(module_tmp):
    root = module_tmp("predictor")
    env, raw = planned_toy(root, DATASET_ID, num_train=6, num_test=2, num_classes=2)
    run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainerGuided", "-device", "cpu",
             "--num_epochs", 1, "--iters_per_epoch", 1, "--clip_model", "random", env=env)
    return {"root": root, "env": env, "raw": raw}


def test_label_maps_and_probabilities_do_not_depend_on_save_uncertainty(guided):
    outputs = {}
    for name, flags in (("plain", []), ("uncertainty", ["--save_uncertainty", "--save_samples"])):
        outputs[name] = guided["root"] / name
        run_tool("nnDiffSeg_predict", "-i", guided["raw"] / "imagesTs", "-o", outputs[name], "-d", DATASET_ID,
                 "-c", "2d", "-tr", "nnDiffSegTrainerGuided", "-f", 0, "-device", "cpu", "--enable_tta",
                 "--save_probabilities", "-nps", 0, *flags, env=guided["env"])
    cases = sorted(f.name for f in outputs["plain"].glob("*.png"))
    assert len(cases) == 2 and (outputs["uncertainty"] / "uncertainty" / cases[0].replace(".png", ".npz")).is_file()
    for case in cases:
        np.testing.assert_array_equal(np.array(Image.open(outputs["plain"] / case)),
                                      np.array(Image.open(outputs["uncertainty"] / case)))
        probabilities = [np.load(outputs[name] / case.replace(".png", ".npz"))["probabilities"] for name in outputs]
        np.testing.assert_array_equal(*probabilities)
