"""The tests every diffusion head must pass (diffusers' ``SchedulerCommonTest`` style): a head's test class
inherits ``HeadTests`` and says how to build its head and how to stand in for its denoiser. No nnU-Net; seconds."""
import pytest
import torch

from nndiffseg.head import DiffusionHead
from nndiffseg.sampling import SAMPLERS


def oracle(x0: torch.Tensor, scheduler, prediction_type: str):
    """The model output that names x0 exactly at (x_t, t), for the given prediction type."""
    def model(x_t, t):
        a = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    return model


class HeadTests:
    image_shape: tuple  # (B, C, H, W) of an image the head takes
    saved: dict  # settings a model is trained with
    other_defaults: dict  # constructor arguments that would predict otherwise
    legacy_build: dict  # values other than the legacy defaults, for the settings that have one
    architecture_change: tuple  # (setting, a value this build does not have)
    overrides: dict  # prediction options that differ from ``saved``
    output_factor: int = 1  # the denoiser's output is at 1/output_factor of the image
    output_channels: int  # the denoiser's output channels

    def make_head(self, **settings) -> DiffusionHead:
        raise NotImplementedError

    def denoiser_returns(self, head: DiffusionHead, output) -> None:
        """Make the head's denoiser return ``output(x_t, t)`` in training and sampling alike."""
        raise NotImplementedError

    def oracle_sample(self, head: DiffusionHead, sampler: str, steps: int):
        """(what the head samples with a denoiser that knows the answer, the answer)."""
        raise NotImplementedError

    def test_the_config_travels_in_the_state_dict_and_wins_over_the_constructors_defaults(self):
        trained = self.make_head(**self.saved).eval()
        image = torch.randn(self.image_shape)
        expected = trained(image)
        rebuilt = self.make_head(**self.other_defaults).eval()
        assert not torch.allclose(rebuilt(image), expected)
        rebuilt.load_state_dict(trained.state_dict())
        assert dict(rebuilt.config) == dict(trained.config)
        torch.testing.assert_close(rebuilt(image), expected)

    def test_a_checkpoint_saved_before_a_setting_existed_loads_with_its_legacy_default(self):
        head = self.make_head()
        legacy = {k: v for k, v in head.legacy_defaults.items() if k not in head.architecture_settings}
        assert set(legacy) == set(self.legacy_build)
        trained = self.make_head(**legacy).eval()
        image = torch.randn(self.image_shape)
        expected = trained(image)
        state = trained.state_dict()
        for name in legacy:
            del state["_extra_state"]["config"][name]
        rebuilt = self.make_head(**self.legacy_build).eval()
        rebuilt.load_state_dict(state)
        assert {k: rebuilt.config[k] for k in legacy} == legacy
        torch.testing.assert_close(rebuilt(image), expected)

    def test_a_checkpoint_of_another_architecture_is_refused_by_name(self):
        name, value = self.architecture_change
        head = self.make_head()
        state = head.state_dict()
        state["_extra_state"]["config"][name] = value
        with pytest.raises(ValueError, match=rf"{name}={value!r} \(this build: {head.config[name]!r}\)"):
            self.make_head().load_state_dict(state)

    def test_prediction_options_override_the_checkpoint_and_survive_loading_further_folds(self):
        head = self.make_head(**self.saved)
        state = head.state_dict()
        head.set_inference_options(**self.overrides)
        head.load_state_dict(state)  # nnU-Net's predictor loads every fold's weights before predicting with them
        assert {k: head.setting(k) for k in self.overrides} == self.overrides
        assert {k: head.config[k] for k in self.overrides} == {k: state["_extra_state"]["config"][k]
                                                                 for k in self.overrides}
        with pytest.raises(ValueError, match="takes no option schedule"):
            head.set_inference_options(schedule="cosine")

    def test_the_ignore_label_is_left_out_of_the_loss(self):
        """The upper half is unlabelled: the loss sends no gradient to the denoiser's output there."""
        head = self.make_head(ignore_label=3)
        batch, _, height, width = self.image_shape
        labels = torch.randint(0, 3, (batch, 1, height, width))
        labels[:, :, :height // 2] = 3  # nnU-Net's ignore label: the highest value, one above the classes
        shape = (batch, self.output_channels, height // self.output_factor, width // self.output_factor)
        output = torch.randn(shape, requires_grad=True)
        self.denoiser_returns(head, lambda x_t, t: output)
        head(torch.randn(self.image_shape), labels, timesteps=torch.full((batch,), 500))["loss"].backward()
        half = shape[2] // 2
        assert (output.grad[:, :, :half] == 0).all() and (output.grad[:, :, half:] != 0).any()

    @pytest.mark.parametrize("sampler", SAMPLERS)
    @pytest.mark.parametrize("steps", [1, 2, 5])
    def test_a_denoiser_that_knows_the_answer_samples_it(self, sampler, steps):
        torch.manual_seed(0)
        result, truth = self.oracle_sample(self.make_head(sampler=sampler, steps=steps).eval(), sampler, steps)
        torch.testing.assert_close(result, truth, atol=5e-3, rtol=0)
