"""Learning test on multi-rater data: a guided head trained on random raters of the synthetic multi-rater fixture
draws the faint blob that half of the raters mark in about half of its samples, where nnU-Net's one mask, an
all-foreground mask and a per-pixel intensity threshold draw it in none or all of them."""
import numpy as np
import pytest
import torch
from torch import nn

from nndiffseg.demo.synthetic_multirater import write_multirater_fixture
from nndiffseg.guided.denoiser import build_denoiser
from nndiffseg.guided.segmenter import GuidedSegmenter
from nndiffseg.guided.text_prior import embed_prompts
from nndiffseg.trainers.guided import TEXT_DIM, nnDiffSegTrainerGuided

pytestmark = pytest.mark.slow  # trains a toy model for about two minutes

SIZE, NUM_TRAIN, NUM_TEST, FAINT_RATERS, NUM_RATERS = 32, 64, 24, 2, 4
# At 32 px the default contrast's faint blob (0.12) is hard to see: the prior then put 0.25-0.32 on it instead of
# the raters' 0.5 and one seed's samples drew it in 0.16-0.23 of the cases (after 1000-2000 steps). The raters'
# disagreement, which the test is about, is the same at any contrast.
FAINT_CONTRAST = 0.3
STEPS, BATCH = 1000, 16


def _normalised(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return (image - image.mean()) / image.std()


def _drawn(masks: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Whether each mask covers more than half of its case's region: masks (..., B, H, W), region (B, H, W)."""
    return (masks & region).sum((-2, -1)) > region.sum((-2, -1)) / 2


def test_guided_samples_draw_the_faint_blob_about_as_often_as_the_raters(tmp_path):
    """Trained 1000 steps (batch 16, a random rater's mask per sample) with the guided trainer's settings for
    multi-rater data (v prediction, DDIM over 10 steps, 16 samples), the head draws the faint blob in a fraction of
    its samples within 0.2 of the raters' 0.5 (measured while writing the test: 0.56 and 0.38 with seeds 0 and 1;
    docs/benchmarks.md, "choosing the guided sampler"). The baselines stated: nnU-Net's mask trained on
    the majority vote is background there (2 of 4 raters is a tie: fraction 0); an all-foreground mask draws it
    always (1); the best per-pixel intensity threshold on the training cases draws it in all of a case's samples or
    in none (it has one answer per case), so its error per case is 0.5."""
    fixture = write_multirater_fixture(tmp_path / "src", NUM_TRAIN, NUM_TEST, SIZE, NUM_RATERS,
                                       faint_raters=FAINT_RATERS, faint_contrast=FAINT_CONTRAST)
    train = [c for c in fixture.cases if c.split == "Training"]
    test = [c for c in fixture.faint_cases() if c.split != "Training"]
    images = torch.from_numpy(np.stack([_normalised(c.image) for c in train]))
    raters = torch.from_numpy(np.stack([np.stack(c.raters) for c in train])).long()  # (N, R, H, W)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prior = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                          nn.ReLU(), nn.Conv2d(16, 2, 3, padding=1))
    head = GuidedSegmenter(prior, build_denoiser(2, 1, TEXT_DIM, "time", (16, 32)),
                           **nnDiffSegTrainerGuided.multirater_settings)
    head.set_text_embeddings(embed_prompts(["background", "blob"], "random"))
    head.set_nnunet_loss(lambda output, target: nn.functional.cross_entropy(output, target[:, 0]))
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(STEPS):
        case, rater = rng.integers(0, len(train), BATCH), rng.integers(0, NUM_RATERS, BATCH)
        loss = head(images[case], raters[case, rater][:, None])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    head.eval()
    test_images = torch.from_numpy(np.stack([_normalised(c.image) for c in test]))
    faint = torch.from_numpy(np.stack([c.faint for c in test]))
    clear = torch.from_numpy(np.stack([c.clear for c in test]))
    with torch.no_grad():
        samples = head.predict(test_images).samples[:, :, 1] > 0.5  # (K, B, H, W)
    assert samples.shape[0] == 16
    fraction = _drawn(samples, faint).float().mean(0)  # per case
    assert abs(fraction.mean().item() - fixture.rater_fraction) <= 0.2, fraction
    assert 0 < fraction.mean() < 1
    assert _drawn(samples, clear).float().mean() >= 0.95  # the blob every rater marks is in every sample
    coverage = (samples & faint).sum((-2, -1)) / faint.sum((-2, -1))
    assert ((coverage < 0.3) | (coverage > 0.7)).float().mean() >= 0.8  # the faint blob drawn whole or not at all

    # the baselines: one answer per case, so the faint blob is in all of its "samples" or in none
    votes = torch.from_numpy(np.stack([np.stack(c.raters).sum(0) > NUM_RATERS / 2 for c in test]))
    assert not _drawn(votes, faint).any()
    assert _drawn(torch.ones_like(faint), faint).all()
    pixels, labels = images.flatten(), raters.float().mean(1).flatten()
    thresholds = torch.quantile(pixels, torch.linspace(0.5, 0.99, 50))
    dice = [2 * ((pixels > t) * labels).sum() / ((pixels > t).sum() + labels.sum()) for t in thresholds]
    rule = test_images[:, 0] > thresholds[int(np.argmax(dice))]
    rule_error = (_drawn(rule, faint).float() - fixture.rater_fraction).abs().mean()
    assert (fraction - fixture.rater_fraction).abs().mean() < rule_error
