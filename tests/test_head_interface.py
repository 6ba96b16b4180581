"""The parts both heads share, without nnU-Net: samplers checked against an oracle, nnU-Net's ignore label left
out of the mask autoencoder's loss and of the validation counts. What every head must do is in head_mixin.py."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from diffusers import AutoencoderKL
from head_mixin import oracle
from torch import nn

from nndiffseg.evaluation.counts import hard_counts
from nndiffseg.latent.mask_autoencoder import MaskAutoencoder
from nndiffseg.sampling import SAMPLERS, denoise, sampling_scheduler, start_timestep, training_scheduler


def test_heads_and_their_tests_import_nothing_of_nnunet():
    """The heads, and the head tests with their helpers, run where nnU-Net is not installed."""
    code = ("import sys, nndiffseg.head, nndiffseg.sampling, nndiffseg.latent.segmenter, "
            "nndiffseg.latent.mask_autoencoder, nndiffseg.guided.segmenter, nndiffseg.evaluation.counts, "
            "toy_data, head_mixin, test_head_interface, test_guided_heads, test_latent_heads; "
            "sys.exit('nnunetv2' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "tests").returncode == 0


# ---- samplers against an oracle
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 5, 50])
@pytest.mark.parametrize("setup", [("linear", "sample", 1.0), ("linear", "epsilon", 1.0),
                                   ("cosine", "v_prediction", 1.0), ("scaled_linear", "epsilon", None)])
def test_every_sampler_recovers_the_oracles_clean_sample_from_the_last_timestep(sampler, steps, setup):
    schedule, prediction_type, clip = setup
    train = training_scheduler(schedule, prediction_type)
    scheduler = sampling_scheduler(train, sampler, steps, clip)
    assert int(scheduler.timesteps[0]) == 999 and len(scheduler.timesteps) == steps
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1  # inside the clip range; latents need none
    if clip is None:
        x0 = x0 * 3
    noise = torch.randn(x0.shape, generator=generator)
    result = denoise(scheduler, oracle(x0, train, prediction_type), noise, generator)
    torch.testing.assert_close(result, x0, atol=2e-3, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("strength", [0.3, 0.5])
def test_a_part_way_start_runs_its_steps_from_there_and_recovers_the_oracles_sample(sampler, strength):
    """strength < 1 (SDEdit): x0's noised version at about strength x 1000, then the sampler's last steps; with
    DDIM's eta = 1 too (ancestral noise, none at the last step)."""
    train = training_scheduler("linear", "sample")
    scheduler = sampling_scheduler(train, sampler, 3, 1.0, strength)
    start = start_timestep(scheduler)
    assert abs(start - strength * 1000) <= 1000 / len(scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    x = train.add_noise(x0, torch.randn(x0.shape, generator=generator), torch.tensor([start] * 2))
    seen = []
    model = oracle(x0, train, "sample")
    result = denoise(scheduler, lambda x_t, t: seen.append(int(t)) or model(x_t, t), x, generator,
                     eta=1.0 if sampler == "ddim" else 0.0)
    assert len(seen) == 3 and seen[0] == start
    # DDIM's last step lands on t = 0 rather than the clean sample when its stride does not divide the
    # trailing grid (here 166): eta = 1 then adds noise of std sqrt(beta_0) = 0.01 there
    tolerance = 0.05 if sampler == "ddim" else 2e-3
    torch.testing.assert_close(result, x0, atol=tolerance, rtol=0)


def _tiny_autoencoder(channels=3):
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1)


def _output_gradient(module: nn.Module, run) -> torch.Tensor:
    """The gradient of ``run()`` (a loss) with respect to ``module``'s output."""
    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append(output)

    handle = module.register_forward_hook(keep)
    try:
        run().backward()
    finally:
        handle.remove()
    return captured[0].grad


def test_ignored_pixels_are_left_out_of_the_mask_autoencoder_loss():
    """The upper half is unlabelled: no gradient reaches the decoded pixels there; with 3 classes the ignore value
    (3) is no extra mask channel (it crashed before)."""
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    labels[:, :, :32] = 3
    image = torch.randn(2, 1, 64, 64)
    autoencoder = MaskAutoencoder(_tiny_autoencoder(), 3, ignore_label=3, segmentation_loss_weight=0.0)
    grad = _output_gradient(autoencoder.autoencoder.decoder, lambda: autoencoder(image, labels)["loss"])
    assert (grad[:, :, :32] == 0).all() and (grad[:, :, 32:] != 0).any()
    assert torch.isfinite(autoencoder(image, torch.full_like(labels, 3))["loss"])


def test_validation_counts_leave_out_the_ignored_pixels():
    reference = torch.tensor([[[1, 1, 3, 3]]])
    prediction = torch.tensor([[0, 1, 1, 0]])
    tp, fp, fn = hard_counts(prediction, reference, 2, ignore_label=3)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([1], [0], [1])
    tp, fp, fn = hard_counts(prediction, torch.tensor([[[1, 1, 0, 0]]]), 2)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([1], [1], [1])
