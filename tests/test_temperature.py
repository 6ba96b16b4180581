"""Temperature scaling fitted on probabilities (nndiffseg.evaluation.temperature)."""
import numpy as np
import pytest

from nndiffseg.evaluation.temperature import fit_temperature, pool_pixels, scale_probabilities


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_a_known_temperature_comes_back_within_five_percent(true_temperature):
    """Labels drawn from softmax(z / T0); the model says softmax(z): over-confident for T0 > 1, under-confident
    for T0 < 1. The fit, seeing only the model's probabilities, returns T0."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 200_000))
    truth = _softmax(logits / true_temperature)
    labels = (rng.random(truth.shape[1]) > truth.cumsum(0)).sum(0)  # one categorical draw per pixel
    fitted = fit_temperature(_softmax(logits).astype(np.float32), labels)
    assert abs(fitted / true_temperature - 1) <= 0.05, fitted


def test_scaling_is_the_softmax_of_the_divided_logits_and_keeps_the_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4, 8, 9))
    p = _softmax(logits).astype(np.float32)
    for t in (0.3, 1.0, 4.0):
        scaled = scale_probabilities(p, t)
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, _softmax(logits / t), atol=1e-5)
        assert np.array_equal(scaled.argmax(0), p.argmax(0))


def test_ignored_pixels_and_bad_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, 50_000))
    labels = (rng.random(50_000) < _softmax(logits / 2.0)[1]).astype(int)
    noisy = labels.copy()
    noisy[:10_000] = 5  # the ignore label: left out, so the fit is that of the other pixels
    assert fit_temperature(_softmax(logits), noisy, ignore_label=5) == pytest.approx(
        fit_temperature(_softmax(logits)[:, 10_000:], labels[10_000:]))
    with pytest.raises(ValueError, match="labels from 0 to 5 for 2 classes"):
        fit_temperature(_softmax(logits), noisy)


def test_pooled_pixels_keep_each_label_with_its_probabilities():
    cases = [np.stack([np.full((4, 5), 0.25), np.full((4, 5), 0.75)]),
             np.stack([np.full((3, 3), 0.9), np.full((3, 3), 0.1)])]
    labels = [np.ones((4, 5), int), np.zeros((3, 3), int)]
    p, y = pool_pixels(cases, labels)
    assert p.shape == (2, 29) and y.shape == (29,)
    p_sub, y_sub = pool_pixels(cases, labels, max_pixels=10)
    assert p_sub.shape == (2, 10)
    assert np.all(p_sub[1][y_sub == 1] == 0.75) and np.all(p_sub[1][y_sub == 0] == 0.1)
