"""Multi-rater metrics (GED, HM-IoU, diversity, majority-vote Dice, calibration against the raters, NCC), each
against an independent hand computation: numbers worked out in comments, pixel sets, brute force and an LP."""
import itertools
import json
import math

import numpy as np
import pytest
from scipy.optimize import linprog

from nndiffseg.evaluation.metrics import dice, iou
from nndiffseg.evaluation.multirater_metrics import (
    MULTIRATER_METRIC_NAMES,
    calibration_to_raters,
    dice_to_majority,
    generalized_energy_distance_squared,
    hungarian_matched_iou,
    majority_vote,
    mean_dice_to_raters,
    multirater_case_metrics,
    normalized_cross_correlation,
    pairwise_iou,
    rater_calibration_counts,
    rater_disagreement,
    sample_diversity,
    uncertainty_ncc,
)


def masks(*pixel_lists, shape=(3, 3)):
    """One (N, *shape) bool stack from lists of (row, column) foreground pixels."""
    stack = np.zeros((len(pixel_lists), *shape), dtype=bool)
    for i, pixels in enumerate(pixel_lists):
        for pixel in pixels:
            stack[(i, *pixel)] = True
    return stack


def set_iou(a, b):
    """IoU of two masks as sets of foreground pixel coordinates; 1 for two empty sets."""
    a, b = set(zip(*np.nonzero(a))), set(zip(*np.nonzero(b)))
    return len(a & b) / len(a | b) if a | b else 1.0


def brute_force_hm_iou(samples, raters):
    """Both lists tiled to lcm(K, R) and the best mean IoU over every permutation."""
    n = math.lcm(len(samples), len(raters))
    s = [samples[i % len(samples)] for i in range(n)]
    y = [raters[i % len(raters)] for i in range(n)]
    iou_table = [[set_iou(a, b) for b in y] for a in s]
    return max(sum(iou_table[i][j] for i, j in enumerate(perm)) / n for perm in itertools.permutations(range(n)))


def random_masks(rng, n, shape=(3, 3), empty_share=0.25):
    stack = rng.random((n, *shape)) < 0.4
    stack[rng.random(n) < empty_share] = False
    return stack


def test_pairwise_iou_agrees_with_metrics_iou_except_empty_pairs():
    rng = np.random.default_rng(0)
    a, b = random_masks(rng, 6, (5, 4)), random_masks(rng, 5, (5, 4))
    a[0] = b[0] = False  # at least one empty-vs-empty pair
    table = pairwise_iou(a, b)
    assert table.shape == (6, 5)
    for i, j in itertools.product(range(6), range(5)):
        expected = iou(a[i], b[j])
        assert table[i, j] == pytest.approx(1.0 if math.isnan(expected) else expected)
        assert table[i, j] == pytest.approx(set_iou(a[i], b[j]))


def test_ged_by_hand_2x2():
    # S1 = {(0,0)}, S2 = {(0,0), (0,1)}, one rater Y = {(0,0), (0,1)}.
    # d(S1, Y) = 1 - 1/2 = 1/2, d(S2, Y) = 0                     -> cross   = (1/2 + 0) / 2       = 1/4
    # d(S1, S1) = d(S2, S2) = 0, d(S1, S2) = d(S2, S1) = 1/2      -> samples = (0 + 1/2 + 1/2 + 0) / 4 = 1/4
    # d(Y, Y) = 0                                                 -> raters  = 0
    # D²_GED = 2 x 1/4 - 1/4 - 0 = 1/4
    samples = masks([(0, 0)], [(0, 0), (0, 1)], shape=(2, 2))
    raters = masks([(0, 0), (0, 1)], shape=(2, 2))
    result = generalized_energy_distance_squared(samples, raters)
    assert result == pytest.approx({"ged_squared": 0.25, "ged_cross": 0.25, "ged_samples": 0.25, "ged_raters": 0.0})


def test_ged_hm_iou_and_diversity_by_hand_3x3_with_an_empty_rater():
    # S1 = top row {(0,0), (0,1), (0,2)}, S2 = {(0,0), (1,0)}; Y1 = {(0,0), (0,1)}, Y2 = empty.
    # IoU(S1, Y1) = 2/3, IoU(S2, Y1) = 1/3, IoU(S, Y2) = 0 (one empty), IoU(S1, S2) = 1/4, IoU(Y2, Y2) = 1 (both empty)
    # cross   = (1/3 + 1 + 2/3 + 1) / 4 = 3/4
    # samples = (0 + 3/4 + 3/4 + 0) / 4 = 3/8
    # raters  = (0 + 1 + 1 + 0) / 4     = 1/2   (d(Y2, Y2) = 0)
    # D²_GED  = 3/2 - 3/8 - 1/2        = 5/8
    # HM-IoU: S1-Y1 & S2-Y2 = (2/3 + 0) / 2 = 1/3, better than S1-Y2 & S2-Y1 = (0 + 1/3) / 2 = 1/6 -> 1/3
    # sample diversity (distinct pairs): d(S1, S2) = 3/4
    samples = masks([(0, 0), (0, 1), (0, 2)], [(0, 0), (1, 0)])
    raters = masks([(0, 0), (0, 1)], [])
    result = generalized_energy_distance_squared(samples, raters)
    assert result == pytest.approx({"ged_squared": 5 / 8, "ged_cross": 3 / 4, "ged_samples": 3 / 8,
                                    "ged_raters": 1 / 2})
    assert hungarian_matched_iou(samples, raters) == pytest.approx(1 / 3)
    assert sample_diversity(samples) == pytest.approx(3 / 4)


def test_raters_as_their_own_samples_score_perfectly():
    rng = np.random.default_rng(1)
    raters = random_masks(rng, 4, (8, 8))
    raters[1] = False
    result = generalized_energy_distance_squared(raters, raters)
    assert result["ged_squared"] == pytest.approx(0.0, abs=1e-12)
    assert result["ged_cross"] == pytest.approx(result["ged_raters"]) and result["ged_raters"] > 0
    assert hungarian_matched_iou(raters, raters) == pytest.approx(1.0)
    # K = 16, R = 4: every rater drawn 4 times is the raters' own distribution, and tiles onto them exactly
    samples = np.repeat(raters, 4, axis=0)
    assert generalized_energy_distance_squared(samples, raters)["ged_squared"] == pytest.approx(0.0, abs=1e-12)
    assert hungarian_matched_iou(samples, raters) == pytest.approx(1.0)


@pytest.mark.parametrize("k, r", [(1, 1), (1, 4), (4, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 2), (2, 3), (3, 2)])
def test_hm_iou_equals_brute_force_over_all_permutations(k, r):
    rng = np.random.default_rng(10 * k + r)
    for _ in range(3):
        samples, raters = random_masks(rng, k), random_masks(rng, r)
        assert hungarian_matched_iou(samples, raters) == pytest.approx(brute_force_hm_iou(samples, raters))


def test_hm_iou_tiles_to_the_least_common_multiple():
    # K = 3, R = 2 -> 6 of each: samples {0}, {0}, {1} twice over (four {0}, two {1}); raters {0}, {1} three times
    # over. Three {0} samples match the three {0} raters (IoU 1), the two {1} samples two {1} raters (IoU 1), the
    # fourth {0} sample the last {1} rater (IoU 0): HM-IoU = 5/6 (without tiling, K = 3 against R = 2, it is not).
    samples = masks([(0, 0)], [(0, 0)], [(0, 1)], shape=(1, 4))
    raters = masks([(0, 0)], [(0, 1)], shape=(1, 4))
    assert hungarian_matched_iou(samples, raters) == pytest.approx(5 / 6)
    assert brute_force_hm_iou(samples, raters) == pytest.approx(5 / 6)


def test_hm_iou_k16_r4_against_a_linear_program():
    rng = np.random.default_rng(2)
    samples, raters = random_masks(rng, 16, (6, 6)), random_masks(rng, 4, (6, 6))
    # the assignment problem on the 16 x 16 tiled table as an LP (integral optimum), solved by HiGHS
    table = np.array([[set_iou(samples[i], raters[j % 4]) for j in range(16)] for i in range(16)])
    rows = np.kron(np.eye(16), np.ones(16))  # each sample matched once
    cols = np.kron(np.ones(16), np.eye(16))  # each tiled rater matched once
    lp = linprog(-table.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.ones(32), bounds=(0, 1), method="highs")
    assert lp.status == 0
    assert hungarian_matched_iou(samples, raters) == pytest.approx(-lp.fun / 16)


def test_empty_masks():
    empty4, empty16 = np.zeros((4, 3, 3), bool), np.zeros((16, 3, 3), bool)
    # all empty on both sides: perfect agreement, no diversity
    result = generalized_energy_distance_squared(empty16, empty4)
    assert result == {"ged_squared": 0.0, "ged_cross": 0.0, "ged_samples": 0.0, "ged_raters": 0.0}
    assert hungarian_matched_iou(empty16, empty4) == 1.0
    assert sample_diversity(empty16) == 0.0
    # empty samples against two raters who mark something different: cross d = 1 always, IoU(Y1, Y2) = 0
    # -> raters = (0 + 1 + 1 + 0) / 4 = 1/2, D²_GED = 2 - 0 - 1/2 = 3/2; every matched IoU 0
    raters = masks([(0, 0)], [(2, 2)])
    result = generalized_energy_distance_squared(empty16, raters)
    assert result == pytest.approx({"ged_squared": 1.5, "ged_cross": 1.0, "ged_samples": 0.0, "ged_raters": 0.5})
    assert hungarian_matched_iou(empty16, raters) == 0.0
    # an empty sample among the samples matches an empty rater with IoU 1: (1 + 1) / 2
    assert hungarian_matched_iou(masks([], [(0, 0)]), masks([(0, 0)], [])) == pytest.approx(1.0)


def test_sample_diversity_single_sample_and_relation_to_ged_term():
    assert sample_diversity(masks([(0, 0)])) == 0.0
    rng = np.random.default_rng(3)
    samples = random_masks(rng, 5, (6, 6))
    # distinct pairs by hand
    pairs = [1 - set_iou(samples[i], samples[j]) for i, j in itertools.combinations(range(5), 2)]
    assert sample_diversity(samples) == pytest.approx(sum(pairs) / len(pairs))
    # GED's term keeps the diagonal: K (K - 1) off-diagonal pairs among K² -> (K - 1) / K of the above
    ged_term = generalized_energy_distance_squared(samples, samples[:1])["ged_samples"]
    assert ged_term == pytest.approx(4 / 5 * sample_diversity(samples))


def test_majority_vote_tie_rule():
    # R = 2 on four pixels: marked by nobody, rater 1 only, rater 2 only, both -> only "both" is foreground
    two = np.array([[[0, 1, 0, 1]], [[0, 0, 1, 1]]], dtype=bool)
    assert majority_vote(two).tolist() == [[False, False, False, True]]
    # R = 4: pixel k marked by k raters (k = 0..4) -> a tie (2 of 4) is background, 3 and 4 foreground
    four = np.array([[[k > i for k in range(5)]] for i in range(4)])
    assert four.sum(axis=0).tolist() == [[0, 1, 2, 3, 4]]
    assert majority_vote(four).tolist() == [[False, False, False, True, True]]
    # R = 3 (odd, no tie): 2 of 3 is foreground
    three = np.array([[[k > i for k in range(4)]] for i in range(3)])
    assert majority_vote(three).tolist() == [[False, False, True, True]]


def test_dice_to_majority_and_mean_dice_to_raters():
    # raters Y1 = {(0,0), (0,1)}, Y2 = {(0,0)}, Y3 = {(0,0), (1,1)} -> majority {(0,0)} (Y1's (0,1) and Y3's (1,1)
    # are single votes). Prediction P = {(0,0), (0,1)}:
    # Dice(P, majority) = 2 x 1 / (2 + 1) = 2/3; Dice(P, Y1) = 1, Dice(P, Y2) = 2/3, Dice(P, Y3) = 2 x 1 / 4 = 1/2
    # -> mean (1 + 2/3 + 1/2) / 3 = 13/18
    raters = masks([(0, 0), (0, 1)], [(0, 0)], [(0, 0), (1, 1)])
    prediction = masks([(0, 0), (0, 1)])[0]
    assert dice_to_majority(prediction, raters) == pytest.approx(2 / 3)
    assert mean_dice_to_raters(prediction, raters) == pytest.approx(13 / 18)
    # Dice keeps metrics.dice's rule: NaN for two empty masks, left out of the mean over raters
    empty = np.zeros((3, 3), bool)
    assert math.isnan(dice(empty, empty))
    two = masks([], [(0, 0)])
    assert math.isnan(dice_to_majority(empty, two))  # majority of {nobody, one of two} is empty
    assert mean_dice_to_raters(empty, two) == 0.0  # the empty rater is left out, the other scores 0
    assert mean_dice_to_raters(masks([(0, 0)])[0], two) == 0.5  # only one empty: 0, kept in the mean
    assert math.isnan(mean_dice_to_raters(empty, masks([], [])))


def test_calibration_by_hand():
    # 1 x 4 pixels, p = 0.1, 0.1, 0.9, 0.9; raters Y1 = 0 1 1 1, Y2 = 0 0 1 1 -> f = 0, 1/2, 1, 1.
    # bins of width 1/15: 0.1 -> bin 1, 0.9 -> bin 13.
    # bin 1: mean p 0.1, mean f 0.25 -> gap 0.15; bin 13: mean p 0.9, mean f 1 -> gap 0.1; each half the pixels
    # ECE = 0.5 x 0.15 + 0.5 x 0.1 = 0.125
    # Brier against f: (0.01 + 0.16 + 0.01 + 0.01) / 4 = 0.0475
    # Brier against each rater: Y1 (0.01 + 0.81 + 0.01 + 0.01) / 4 = 0.21, Y2 0.04 / 4 = 0.01 -> mean 0.11
    #   = 0.0475 + mean f (1 - f) = 0.0475 + (1/4) / 4
    p = np.array([[0.1, 0.1, 0.9, 0.9]])
    raters = np.array([[[0, 1, 1, 1]], [[0, 0, 1, 1]]], dtype=bool)
    assert calibration_to_raters(p, raters) == pytest.approx({"ece": 0.125, "brier": 0.0475, "brier_raters": 0.11})


def test_calibration_of_the_raters_own_frequencies():
    rng = np.random.default_rng(4)
    raters = random_masks(rng, 3, (16, 16), empty_share=0.0)
    f = raters.mean(axis=0)
    result = calibration_to_raters(f, raters)
    # p = f: each bin's mean probability is its mean f (ECE 0), p - f = 0 everywhere (Brier against f 0), and
    # against the raters' hard labels mean_r (f - y_r)² = f² - 2 f f + f = f (1 - f) per pixel
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["brier"] == 0.0
    assert result["brier_raters"] == pytest.approx(float(np.mean(f * (1 - f))))
    assert result["brier_raters"] > 0
    # counts pool over cases like uncertainty_metrics' CalibrationCounts
    pooled = rater_calibration_counts(f[:8], raters[:, :8])
    pooled += rater_calibration_counts(f[8:], raters[:, 8:])
    assert pooled.ece == pytest.approx(0.0, abs=1e-12) and pooled.brier == pytest.approx(result["brier_raters"])


def test_normalized_cross_correlation():
    rng = np.random.default_rng(5)
    a, b = rng.random((7, 9)), rng.random((7, 9))
    assert normalized_cross_correlation(a, a) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, -a) == pytest.approx(-1.0)
    assert normalized_cross_correlation(a, 3 * a + 2) == pytest.approx(1.0)
    assert normalized_cross_correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    # a constant map: the correlation is undefined -> NaN, as case_spearman
    assert math.isnan(normalized_cross_correlation(a, np.full_like(a, 0.3)))
    assert math.isnan(normalized_cross_correlation(np.zeros_like(a), a))


def test_uncertainty_ncc_against_the_raters_disagreement_by_hand():
    # raters Y1 = 1 1 0 0, Y2 = 1 0 1 0 -> f = 1, 1/2, 1/2, 0 -> v = f (1 - f) = 0, 1/4, 1/4, 0 (mean 1/8)
    # u = 0 1 0 0 (mean 1/4): u - 1/4 = -1/4, 3/4, -1/4, -1/4; v - 1/8 = -1/8, 1/8, 1/8, -1/8
    # mean product = (1/32 + 3/32 - 1/32 + 1/32) / 4 = 1/32; std u = sqrt(3/16) = sqrt(3)/4, std v = 1/8
    # NCC = (1/32) / (sqrt(3)/32) = 1/sqrt(3)
    raters = np.array([[[1, 1, 0, 0]], [[1, 0, 1, 0]]], dtype=bool)
    assert rater_disagreement(raters).tolist() == [[0.0, 0.25, 0.25, 0.0]]
    assert uncertainty_ncc(np.array([[0.0, 1.0, 0.0, 0.0]]), raters) == pytest.approx(1 / math.sqrt(3))
    assert uncertainty_ncc(np.array([[0.0, 1.0, 1.0, 0.0]]), raters) == pytest.approx(1.0)
    # raters who agree everywhere: constant disagreement map -> NaN
    assert math.isnan(uncertainty_ncc(np.array([[0.0, 1.0, 0.0, 0.0]]), raters[[0, 0]]))


def test_case_metrics_flat_dict():
    rng = np.random.default_rng(6)
    samples, raters = random_masks(rng, 16, (8, 8)), random_masks(rng, 4, (8, 8))
    probabilities, uncertainty = samples.mean(axis=0), rng.random((8, 8))
    result = multirater_case_metrics(samples, raters, probabilities, uncertainty)
    assert tuple(result) == MULTIRATER_METRIC_NAMES
    assert all(type(v) is float for v in result.values())
    json.dumps(result)
    assert result["ged_squared"] == pytest.approx(generalized_energy_distance_squared(samples, raters)["ged_squared"])
    assert result["hm_iou"] == pytest.approx(hungarian_matched_iou(samples, raters))
    # the default fused mask is the samples' majority vote (mean > 1/2)
    fused = probabilities > 0.5
    assert result["dice_majority"] == pytest.approx(dice_to_majority(fused, raters), nan_ok=True)
    assert result["dice_raters_mean"] == pytest.approx(mean_dice_to_raters(fused, raters), nan_ok=True)
    assert result["ncc"] == pytest.approx(uncertainty_ncc(uncertainty, raters))
    # same keys without the optional inputs, NaN there; an explicit prediction is scored instead
    bare = multirater_case_metrics(samples, raters, prediction=raters[0])
    assert tuple(bare) == MULTIRATER_METRIC_NAMES
    assert all(math.isnan(bare[k]) for k in ("ece", "brier", "brier_raters", "ncc"))
    assert bare["dice_raters_mean"] == pytest.approx(mean_dice_to_raters(raters[0], raters))


def test_shape_errors():
    with pytest.raises(ValueError, match="differs"):
        generalized_energy_distance_squared(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="non-empty"):
        hungarian_matched_iou(np.zeros((0, 3, 3), bool), np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="probabilities shape"):
        calibration_to_raters(np.zeros((3, 4)), np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="prediction shape"):
        multirater_case_metrics(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), bool), prediction=np.zeros((3, 4)))
