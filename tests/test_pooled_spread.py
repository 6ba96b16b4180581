"""The uncertainty of an ensemble (nndiffseg.inference.pooled_spread) against the spread of all members' samples
taken as one set, computed directly."""
import pytest
import torch

from nndiffseg.guided.fusion import uncertainty
from nndiffseg.inference.pooled_spread import PooledSpread


def _samples(k: int, seed: int) -> torch.Tensor:
    """(K, 1, 2, 6, 5) two-class probabilities of K samples."""
    foreground = torch.rand((k, 1, 1, 6, 5), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.cat([1 - foreground, foreground], dim=2)


def test_two_classes_pooled_spread_is_the_spread_of_all_samples():
    members = [_samples(4, seed) for seed in range(3)]
    pooled = PooledSpread()
    for samples in members:
        pooled.add(samples.mean(0)[0], uncertainty(samples)[0])  # the mean fusion and the head's spread
    expected = uncertainty(torch.cat(members))[0]
    torch.testing.assert_close(pooled.spread().double(), expected, atol=1e-6, rtol=0)


def test_one_member_keeps_its_spread_and_members_without_samples_add_their_disagreement():
    samples = _samples(5, 0)
    one = PooledSpread()
    one.add(samples.mean(0)[0], uncertainty(samples)[0])
    torch.testing.assert_close(one.spread().double(), uncertainty(samples)[0], atol=1e-6, rtol=0)
    agreeing = PooledSpread()
    for _ in range(3):
        agreeing.add(samples[0, 0])
    assert agreeing.spread().abs().max() < 1e-6
    a, b = samples[0, 0], samples[1, 0]
    two = PooledSpread()
    two.add(a), two.add(b)
    torch.testing.assert_close(two.spread().double(), (a[1] - b[1]).abs() / 2, atol=1e-6, rtol=0)


def test_members_of_different_shapes_are_refused():
    pooled = PooledSpread()
    pooled.add(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        pooled.add(torch.rand(2, 4, 5))
