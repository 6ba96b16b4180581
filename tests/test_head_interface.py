"""The interface both heads share, without nnU-Net: samplers checked against an oracle, settings that travel
with the weights (a changed default does not change what a saved model predicts), nnU-Net's ignore label
left out of every loss, and the latent scale shared across DDP ranks."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from conftest import REPO_ROOT
from nndiffseg.evaluation.counts import hard_counts
from nndiffseg.guided.denoiser import build_denoiser as build_guided_denoiser
from nndiffseg.guided.mask_encoding import encode_labels
from nndiffseg.guided.segmenter import GuidedSegmenter
from nndiffseg.latent.autoencoders import build_denoiser as build_latent_denoiser
from nndiffseg.latent.mask_autoencoder import MaskAutoencoderHead
from nndiffseg.latent.segmenter import LatentSegmenter
from nndiffseg.sampling import SAMPLERS, denoise, sampling_scheduler, start_timestep, training_scheduler

TEXT_DIM = 16


def test_heads_and_their_tests_import_nothing_of_nnunet():
    """The heads, and the head tests with their helpers, run where nnU-Net is not installed."""
    code = ("import sys, nndiffseg.head, nndiffseg.sampling, nndiffseg.latent.segmenter, "
            "nndiffseg.latent.mask_autoencoder, nndiffseg.guided.segmenter, nndiffseg.evaluation.counts, "
            "toy_data, test_head_interface, test_guided_heads, test_latent_heads; "
            "sys.exit('nnunetv2' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "tests").returncode == 0


# ---- samplers against an oracle
def _oracle(x0: torch.Tensor, scheduler, prediction_type: str):
    """The model output that names x0 exactly at (x_t, t), for the given prediction type."""
    def model(x_t, t):
        a = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    return model


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
    result = denoise(scheduler, _oracle(x0, train, prediction_type), noise, generator)
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
    oracle = _oracle(x0, train, "sample")
    result = denoise(scheduler, lambda x_t, t: seen.append(int(t)) or oracle(x_t, t), x, generator,
                     eta=1.0 if sampler == "ddim" else 0.0)
    assert len(seen) == 3 and seen[0] == start
    # DDIM's last step lands on t = 0 rather than the clean sample when its stride does not divide the
    # trailing grid (here 166): eta = 1 then adds noise of std sqrt(beta_0) = 0.01 there
    tolerance = 0.05 if sampler == "ddim" else 2e-3
    torch.testing.assert_close(result, x0, atol=tolerance, rtol=0)


class TextlessPrior(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 3, padding=1)

    def forward(self, image):
        return self.conv(image)


def _guided(**settings) -> GuidedSegmenter:
    torch.manual_seed(0)
    return GuidedSegmenter(TextlessPrior(), build_guided_denoiser(3, 1, TEXT_DIM, "time", (8, 16)), **settings)


def _tiny_autoencoder(channels=3):
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1)


def _latent(num_classes=3, **settings) -> LatentSegmenter:
    torch.manual_seed(0)
    return LatentSegmenter(_tiny_autoencoder(), _tiny_autoencoder(max(3, num_classes)), build_latent_denoiser("compact"),
                           num_classes, 1, preset="compact", **settings)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 5, 50])
def test_both_heads_sample_the_oracles_mask(sampler, steps):
    """The heads' own sampling loops, with their denoisers replaced by an oracle that knows the answer."""
    labels = torch.randint(0, 3, (1, 1, 16, 16))
    guided = _guided(prediction_type="sample").eval()
    x0 = encode_labels(labels, 3)
    oracle = _oracle(x0.repeat(2, 1, 1, 1), guided.train_scheduler, "sample")
    guided.denoiser.predict = lambda x, t, condition, text: oracle(x, t)
    samples = guided.sample(torch.randn(1, 1, 16, 16), num_samples=2, sampler=sampler, steps=steps)
    assert torch.equal(samples.argmax(2), labels[:, 0].expand(2, 1, 16, 16))

    latent = _latent(sampler=sampler, steps=steps).eval()
    z0 = torch.randn(1, 4, 8, 8) * 2
    latent_oracle = _oracle(z0, latent.train_scheduler, "epsilon")
    latent.denoiser.forward = lambda x, t: SimpleNamespace(sample=latent_oracle(x[:, :4], t))
    torch.testing.assert_close(latent.sample_latent(torch.zeros(1, 4, 8, 8)), z0, atol=5e-3, rtol=0)


# ---- settings saved with the weights
def test_a_changed_default_does_not_change_what_a_saved_guided_model_predicts():
    trained = _guided(prediction_type="sample", steps=2, num_samples=2).eval()
    image = torch.randn(1, 1, 16, 16)
    expected = trained(image)
    rebuilt = _guided(prediction_type="epsilon", schedule="cosine", steps=7, num_samples=4).eval()  # new defaults
    assert not torch.allclose(rebuilt(image), expected)
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.config["prediction_type"] == "sample" and rebuilt.config["steps"] == 2
    torch.testing.assert_close(rebuilt(image), expected)


def test_prediction_options_override_the_checkpoint_and_survive_loading_further_folds():
    head = _guided(steps=2)
    state = head.state_dict()
    head.set_inference_options(steps=3, num_samples=1)
    head.load_state_dict(state)  # nnU-Net's predictor loads every fold's weights before predicting with them
    assert head.setting("steps") == 3 and head.setting("num_samples") == 1 and head.config["steps"] == 2
    with pytest.raises(ValueError, match="takes no option prior_weight"):
        head.set_inference_options(prior_weight=1.0)


def test_a_checkpoint_saved_before_a_setting_existed_loads_with_the_value_that_reproduces_it():
    trained = _guided(steps=2, num_samples=2).eval()
    image = torch.randn(1, 1, 16, 16)
    expected = trained(image)
    state = trained.state_dict()
    for added in ("eta", "strength", "uncertainty"):  # settings added after the first checkpoints were saved
        del state["_extra_state"]["config"][added]
    rebuilt = _guided(eta=0.5, strength=0.4, uncertainty="total").eval()
    rebuilt.load_state_dict(state)
    assert rebuilt.setting("eta") == 0.0 and rebuilt.setting("strength") == 1.0
    assert rebuilt.setting("uncertainty") == "spread"
    torch.testing.assert_close(rebuilt(image), expected)


def test_a_checkpoint_of_another_architecture_is_refused_by_name():
    state = _latent().state_dict()
    state["_extra_state"]["config"]["preset"] = "sd"
    with pytest.raises(ValueError, match=r"preset='sd' \(this build: 'compact'\)"):
        _latent().load_state_dict(state)


def test_a_changed_default_does_not_change_what_a_saved_latent_model_predicts():
    trained = _latent(steps=1).eval()
    trained.mask_latent_scale.fill_(0.7)
    image = torch.randn(1, 1, 64, 64)
    expected = trained(image)
    rebuilt = _latent(steps=4, schedule="linear").eval()
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.config["steps"] == 1 and rebuilt.config["schedule"] == "scaled_linear"
    torch.testing.assert_close(rebuilt(image), expected)


# ---- nnU-Net's ignore label
def test_ignored_pixels_are_left_out_of_the_guided_loss():
    """An oracle that names the true classes everywhere, also where the annotation is missing: the loss is 0
    only when the ignored pixels are left out."""
    truth = torch.randint(0, 3, (2, 1, 16, 16))
    labels = truth.clone()
    labels[:, :, :5] = 3  # nnU-Net's ignore label: the highest value, one above the classes
    head = _guided(prediction_type="sample", ignore_label=3)
    x0 = encode_labels(truth, 3)
    head.denoiser.forward = lambda noisy, t, image, prior, text: x0
    losses = head(torch.randn(2, 1, 16, 16), labels)
    assert losses["diffusion_loss"] < 1e-12
    head.register_to_config(ignore_label=None)
    with pytest.raises(RuntimeError):  # without an ignore label the value 3 is no class of 3
        head(torch.randn(2, 1, 16, 16), labels)


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


def test_ignored_pixels_are_left_out_of_the_latent_and_autoencoder_losses():
    """The upper half is unlabelled: no gradient reaches the latent cells wholly under it, nor the decoded
    pixels there; with 3 classes the ignore value (3) is no extra mask channel (it crashed before)."""
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    labels[:, :, :32] = 3
    latent = _latent(ignore_label=3)
    image = torch.randn(2, 1, 64, 64)
    noise, t = torch.randn(2, 4, 32, 32), torch.tensor([100, 900])  # the tiny autoencoder downsamples by 2
    grad = _output_gradient(latent.denoiser.conv_out,
                            lambda: latent(image, labels, noise=noise, timesteps=t)["loss"])
    assert (grad[:, :, :16] == 0).all() and (grad[:, :, 16:] != 0).any()
    assert latent(image, torch.full_like(labels, 3), noise=noise, timesteps=t)["loss"] == 0

    autoencoder = MaskAutoencoderHead(_tiny_autoencoder(), 3, ignore_label=3)
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
