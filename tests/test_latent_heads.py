"""The single-step latent diffusion heads on their own (no nnU-Net): mask encoding, autoencoder and
denoiser loading, the closed-form clean latent, determinism, and mask autoencoder fine-tuning."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from head_mixin import HeadTests, oracle
from toy_data import toy_case

from nndiffseg.latent.autoencoders import (
    build_autoencoder,
    build_denoiser,
    load_pretrained_autoencoder,
    load_pretrained_denoiser,
    widen_first_conv,
)
from nndiffseg.latent.mask_autoencoder import MaskAutoencoder
from nndiffseg.latent.segmenter import LatentSegmenter
from nndiffseg.mask_encoding import decoded_to_scores, encode_labels, mask_channels


def test_mask_encoding_is_one_hot_in_minus_one_one_with_padding():
    labels = torch.tensor([[[0, 1], [1, 0]]])
    encoded = encode_labels(labels, mask_channels(2))
    assert encoded.shape == (1, 3, 2, 2) and mask_channels(2) == 3 and mask_channels(5) == 5
    assert encoded[0, :, 0, 1].tolist() == [-1, 1, -1]  # class 1 on, background and padding off
    assert (encoded[0, 2] == -1).all()  # the padding channel is "absent" everywhere
    assert torch.equal(decoded_to_scores(encoded, 2).argmax(1), labels)


def test_widened_convolution_keeps_the_pretrained_response():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    wider = widen_first_conv(conv, 8)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(wider(x), conv(x[:, :4]))


def _tiny_autoencoder(channels=3):
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1)


def test_pretrained_parts_load_from_a_local_diffusers_folder(tmp_path):
    vae = _tiny_autoencoder()
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    unet = UNet2DModel(in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "pipeline" / "unet")
    loaded = load_pretrained_autoencoder(str(tmp_path / "pipeline"))
    torch.testing.assert_close(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert load_pretrained_autoencoder(str(tmp_path / "pipeline" / "vae")).config.block_out_channels == [8, 8]
    denoiser = load_pretrained_denoiser(str(tmp_path / "pipeline"))
    assert denoiser.conv_in.in_channels == 8 and denoiser.config.in_channels == 8
    torch.testing.assert_close(denoiser.conv_in.weight[:, :4], unet.conv_in.weight)
    assert (denoiser.conv_in.weight[:, 4:] == 0).all()


def test_a_text_conditioned_unet_is_not_taken_as_the_denoiser(tmp_path):
    UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                         cross_attention_dim=8, layers_per_block=1,
                         down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert load_pretrained_denoiser(str(tmp_path)) is None


def test_missing_weights_fail_loudly(tmp_path):
    with pytest.raises(OSError):
        load_pretrained_autoencoder(str(tmp_path / "nowhere"))


@pytest.fixture
def segmenter():
    torch.manual_seed(0)
    return LatentSegmenter(_tiny_autoencoder(), _tiny_autoencoder(), build_denoiser("compact"), num_classes=3,
                           image_channels=1)


def test_clean_latent_inverts_the_schedulers_noising(segmenter):
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    noisy = segmenter.train_scheduler.add_noise(z0, noise, t)
    torch.testing.assert_close(segmenter._clean_latent(noisy, noise, t), z0, rtol=1e-4, atol=1e-4)


def test_prediction_is_deterministic_and_shaped_as_class_scores(segmenter):
    segmenter.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        first, second = segmenter(x), segmenter(x)
        segmenter.set_inference_options(steps=3)
        ddim = segmenter(x)
    assert first.shape == (2, 3, 64, 64) and torch.equal(first, second)
    assert not torch.equal(first, ddim)


@pytest.mark.slow  # trains a toy model (seconds to minutes): the slow tier
def test_training_reduces_the_loss_and_leaves_the_mask_autoencoder_frozen(segmenter):
    frozen = {k: v.clone() for k, v in segmenter.mask_autoencoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], 1e-3)
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    segmenter.train()
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        loss = segmenter(x, y)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(torch.equal(v, segmenter.mask_autoencoder.state_dict()[k]) for k, v in frozen.items())


def _toy_masks(rng, n):
    return torch.from_numpy(np.stack([toy_case(rng, 64, 64, num_classes=2)[1] for _ in range(n)]))[:, None].long()


def _dice_per_class(prediction, reference, classes):
    return [float(2 * ((prediction == c) & (reference == c)).sum() / ((prediction == c).sum() + (reference == c).sum()))
            for c in classes]


def _fit(parameters, loss_fn, steps, lr):
    optimizer = torch.optim.AdamW(parameters, lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


# the factor nnDiffSegTrainerLatent chooses for a 64 px patch (an f8 latent would be 8 x 8)
TOY_DOWNSAMPLING = 4


def fine_tune_toy_mask_autoencoder():
    """The compact f4 mask autoencoder after a short fine-tune on 3-class toy masks: 400 steps of 4 masks,
    one-cycle schedule, about 4 min on one thread (0.99 needs them: 300 steps left class 1 at 0.987)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    autoencoder = MaskAutoencoder(build_autoencoder("compact", 3, TOY_DOWNSAMPLING), 3, segmentation_loss_weight=0.0)
    _fit(autoencoder.parameters(), lambda: autoencoder.losses(None, _toy_masks(rng, 4))["loss"], 400, 3e-3)
    return autoencoder.autoencoder.eval()


@pytest.fixture(scope="module")
def fine_tuned_mask_autoencoder():
    return fine_tune_toy_mask_autoencoder()


@pytest.mark.slow  # trains a toy model (seconds to minutes): the slow tier
def test_mask_autoencoder_fine_tune_reconstructs_three_class_masks(fine_tuned_mask_autoencoder):
    """The issue's bar: after a short fine-tune, decode(encode(mask)) has per-class Dice >= 0.99
    (measured 0.9989 / 0.9927 / 0.9952; the f8 autoencoder reached 0.995 / 0.957 / 0.980 after 300 steps)."""
    test = _toy_masks(np.random.default_rng(1), 16)[:, 0]
    reconstructed = MaskAutoencoder(fine_tuned_mask_autoencoder, 3).reconstruct(test)
    for c, dice in enumerate(_dice_per_class(reconstructed, test, (0, 1, 2))):
        assert dice >= 0.99, (c, dice)


@pytest.mark.slow  # trains a toy model (seconds to minutes): the slow tier
def test_mask_latent_scale_is_calibrated_to_unit_variance_and_saved(fine_tuned_mask_autoencoder):
    model = LatentSegmenter(build_autoencoder("compact", 3, TOY_DOWNSAMPLING), fine_tuned_mask_autoencoder,
                            build_denoiser("compact"), 3, 3)
    masks = [_toy_masks(np.random.default_rng(2), 8) for _ in range(2)]
    scale = model.calibrate_mask_latent_scale(masks)
    assert scale != pytest.approx(fine_tuned_mask_autoencoder.config.scaling_factor, rel=0.05)
    assert float(model.encode_mask(torch.cat(masks)).std()) == pytest.approx(1.0, abs=1e-3)
    assert model.state_dict()["mask_latent_scale"] == pytest.approx(scale)


def test_inference_steps_are_set_by_option_and_checked(segmenter):
    assert [o.name for o in segmenter.prediction_options] == ["steps", "sampler", "seed"]
    segmenter.set_inference_options(steps=10)
    assert segmenter.setting("steps") == 10 and segmenter.config["steps"] == 1
    with pytest.raises(ValueError, match="sampling steps must be an integer from 1 to 1000"):
        segmenter.set_inference_options(steps=0)
    assert segmenter.setting("steps") == 10
    segmenter.register_to_config(timesteps="inference")
    with pytest.warns(UserWarning, match="trained at the last timestep only .* 4 sampling steps"):
        segmenter.set_inference_options(steps=4)


def _planned_like_segmenter(**settings):
    """A segmenter whose image encoder is a small conv stack at 1/4 resolution (what the trainer cuts from
    nnU-Net's planned U-Net) and whose mask autoencoder is compact f4."""
    from nndiffseg.latent.segmenter import PlannedImageEncoder
    torch.manual_seed(0)
    stages = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.LeakyReLU(),
                                 torch.nn.Conv2d(16, 16, 3, stride=2, padding=1))
    return LatentSegmenter(PlannedImageEncoder(stages, 16, 8), build_autoencoder("compact", 3, 4),
                           build_denoiser("compact", 4 + 8), num_classes=3, image_channels=3, **settings)


def _soft_dice_ce(scores, target):
    probs = torch.softmax(scores, 1)
    one_hot = torch.nn.functional.one_hot(target[:, 0], scores.shape[1]).permute(0, 3, 1, 2).float()
    dice = 1 - (2 * (probs * one_hot).sum() + 1) / (probs.sum() + one_hot.sum() + 1)
    return dice + torch.nn.functional.cross_entropy(scores, target[:, 0])


def test_planned_encoder_f4_and_the_decoded_mask_loss():
    """Conditioning at 1/4 of the image, a mask latent at 1/4, and the decoded-mask loss: it needs the loss set,
    reaches the image encoder through the frozen decoder, and the settings are saved with the weights."""
    model = _planned_like_segmenter(decoded_loss_weight=1.0)
    assert model.config["conditioning"] == "planned" and model.config["latent_downsampling"] == 4
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    model.train()
    with pytest.raises(RuntimeError, match="set_nnunet_loss"):
        model(x, y)
    model.set_nnunet_loss(_soft_dice_ce)
    losses = model(x, y)
    assert "decoded_mask_loss" in losses and losses["decoded_mask_loss"] > 0
    losses["loss"].backward()
    assert model.image_encoder.project.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mask_autoencoder.parameters())  # frozen
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 64, 64)
    restored = _planned_like_segmenter()
    restored.load_state_dict(model.state_dict())
    assert restored.config["decoded_loss_weight"] == 1.0


def test_a_checkpoint_of_another_conditioning_or_latent_factor_is_refused(segmenter):
    with pytest.raises(ValueError, match="conditioning='kl'.*latent_downsampling=2"):
        _planned_like_segmenter().load_state_dict(segmenter.state_dict())


def test_inference_timesteps_train_only_the_step_prediction_takes(segmenter):
    seen = []
    forward = segmenter.denoiser.forward
    segmenter.denoiser.forward = lambda sample, t, *a, **k: seen.append(t.tolist()) or forward(sample, t, *a, **k)
    segmenter.train()
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    segmenter(x, y)
    segmenter.register_to_config(timesteps="inference")
    segmenter(x, y)
    assert seen[0] != [999, 999] and seen[1] == [999, 999]
    with pytest.raises(ValueError, match="timesteps must be one of uniform, inference"):
        segmenter.register_to_config(timesteps="late")


def test_mask_autoencoder_segmentation_loss_term_is_added_and_saved():
    """segmentation_loss_weight > 0 adds the trainer's loss of the decoded class scores (it needs it set); the
    weight is saved with the weights, and a checkpoint saved before the setting existed loads with 0."""
    torch.manual_seed(0)
    head = MaskAutoencoder(build_autoencoder("compact", mask_channels(3), 4), 3, "compact",
                               segmentation_loss_weight=0.5).train()
    y = torch.randint(0, 3, (2, 1, 32, 32))
    with pytest.raises(RuntimeError, match="set_nnunet_loss"):
        head(torch.zeros(2, 3, 32, 32), y)
    head.set_nnunet_loss(_soft_dice_ce)
    torch.manual_seed(1)
    losses = head(torch.zeros(2, 3, 32, 32), y)
    torch.manual_seed(1)
    plain = MaskAutoencoder(head.autoencoder, 3, segmentation_loss_weight=0.0).losses(None, y)
    assert losses["segmentation_loss"] > 0
    torch.testing.assert_close(losses["loss"], plain["loss"] + 0.5 * losses["segmentation_loss"])
    restored = MaskAutoencoder(build_autoencoder("compact", mask_channels(3), 4), 3, "compact")
    restored.load_state_dict(head.state_dict())
    assert restored.config["segmentation_loss_weight"] == 0.5
    old = head.state_dict()
    old_state = next(k for k in old if k.endswith("_extra_state"))
    old[old_state] = {**old[old_state], "config": {k: v for k, v in old[old_state]["config"].items()
                                                   if k != "segmentation_loss_weight"}}
    restored.load_state_dict(old)
    assert restored.config["segmentation_loss_weight"] == 0.0


def test_clean_latent_prediction_is_the_one_step_estimate_and_the_latent_loss(segmenter):
    """prediction_type 'sample': the denoiser's output is z0_hat. The loss is its L1 to the mask latent (no
    noise term), and one DDIM step returns it unchanged, decoded; other prediction types are refused."""
    segmenter.register_to_config(prediction_type="sample")
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    z0 = segmenter.encode_mask(y)
    noise, t = torch.randn_like(z0), torch.tensor([999, 300])
    segmenter.train()
    losses = segmenter.losses(x, y, noise=noise, timesteps=t)
    noisy = segmenter.train_scheduler.add_noise(z0, noise, t)
    output = segmenter.denoiser(torch.cat([noisy, segmenter.image_encoder(x)], dim=1), t).sample
    assert set(losses) == {"loss", "latent_loss"}
    torch.testing.assert_close(losses["loss"], (output - z0).abs().mean())
    segmenter.eval()
    with torch.no_grad():
        cond = segmenter.image_encoder(x)
        z_t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(segmenter.setting("seed")))
        expected = segmenter.decode_mask(segmenter.denoiser(torch.cat([z_t, cond], dim=1), torch.tensor(999)).sample)
        torch.testing.assert_close(segmenter(x), expected)
    with pytest.raises(ValueError, match="predicts the noise .* or the clean latent"):
        segmenter.register_to_config(prediction_type="v_prediction")


def test_foreground_weight_weighs_latent_cells_by_their_foreground_fraction(segmenter):
    """f4 latent cells of an 8 x 8 label map: a wholly foreground cell weighs w, a background one 1, a cell half
    foreground 1 + (w - 1) / 2; with an ignore label the weight is also scaled by the labelled fraction (ignored
    pixels are not foreground)."""
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[..., :4, :4] = 2   # cell (0, 0): all foreground
    labels[..., :4, 4:6] = 1  # cell (0, 1): half foreground
    labels[..., 4:, 4:6] = 7  # cell (1, 1): half label 7 (foreground, or ignored once 7 is the ignore label)
    assert segmenter._latent_weights(labels, (1, 4, 2, 2)) is None
    segmenter.register_to_config(foreground_weight=4.0)
    torch.testing.assert_close(segmenter._latent_weights(labels, (1, 4, 2, 2)),
                               torch.tensor([[[[4.0, 2.5], [1.0, 2.5]]]]))
    segmenter.register_to_config(ignore_label=7)
    torch.testing.assert_close(segmenter._latent_weights(labels, (1, 4, 2, 2)),
                               torch.tensor([[[[4.0, 2.5], [1.0, 0.5]]]]))
    with pytest.raises(ValueError, match="foreground_weight must be >= 1"):
        segmenter.register_to_config(foreground_weight=0.5)


class TestLatentHead(HeadTests):
    image_shape = (2, 1, 64, 64)
    saved = dict(steps=1)
    other_defaults = dict(steps=4, schedule="linear")
    legacy_build = dict(decoded_loss_weight=1.0, timesteps="inference", foreground_weight=4.0)
    architecture_change = ("preset", "sd")
    overrides = dict(steps=3, sampler="ddpm", seed=2)
    output_factor = 2  # the tiny autoencoder's
    output_channels = 4

    def make_head(self, **settings) -> LatentSegmenter:
        torch.manual_seed(0)
        return LatentSegmenter(_tiny_autoencoder(), _tiny_autoencoder(), build_denoiser("compact"), 3, 1,
                               preset="compact", **settings)

    def denoiser_returns(self, head, output) -> None:
        head.denoiser.forward = lambda x, t: SimpleNamespace(sample=output(x[:, :4], t))

    def oracle_sample(self, head, sampler, steps):
        z0 = torch.randn(1, 4, 8, 8) * 2
        self.denoiser_returns(head, oracle(z0, head.train_scheduler, head.config["prediction_type"]))
        return head.sample_latent(torch.zeros(1, 4, 8, 8)), z0
