"""Calibration and failure-detection metrics, each against an independent hand computation, and
nnDiffSeg_evaluate scoring probabilities (.npz) and uncertainty maps from a prediction folder."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.evaluate import evaluate_folders
from nndiffseg.evaluation.multirater_metrics import pairwise_dice
from nndiffseg.evaluation.uncertainty_metrics import (
    CalibrationCounts,
    aurc,
    case_spearman,
    normalized_entropy,
    pixel_auroc,
    risk_coverage,
    uncertainty_error_overlap,
)


def hand_ece(p, y, bins=15):
    total, ece = len(p), 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        members = [k for k in range(total) if lo <= p[k] < hi or (i == bins - 1 and p[k] == 1.0)]
        if members:
            confidence = sum(p[k] for k in members) / len(members)
            frequency = sum(y[k] for k in members) / len(members)
            ece += len(members) / total * abs(confidence - frequency)
    return ece


def hand_auroc(u, error):
    """Mann-Whitney: the share of (error, correct) pixel pairs where the error pixel is less certain, ties 1/2."""
    wrong = [a for a, e in zip(u, error) if e]
    right = [a for a, e in zip(u, error) if not e]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in wrong for b in right)
    return wins / (len(wrong) * len(right))


def test_ece_and_brier_against_hand_computation():
    rng = np.random.default_rng(0)
    p = np.r_[rng.random(300), 0.0, 1.0, 14 / 15]  # bin edges included
    y = rng.random(p.size) < p ** 2  # over-confident on purpose
    counts = CalibrationCounts().add(p, y)
    assert counts.ece == pytest.approx(hand_ece(list(p), list(y)))
    assert counts.brier == pytest.approx(sum((a - b) ** 2 for a, b in zip(p, y)) / len(p))
    assert counts.ece > 0.05
    # accumulating two halves (two cases) gives the pooled numbers
    halves = CalibrationCounts().add(p[:150], y[:150])
    halves += CalibrationCounts().add(p[150:], y[150:])
    assert halves.ece == pytest.approx(counts.ece) and halves.brier == pytest.approx(counts.brier)
    # perfectly calibrated bins: every pixel at 0 or 1 and right
    assert CalibrationCounts().add(y.astype(float), y).ece == 0.0


def test_pixel_auroc_against_pairwise_count():
    rng = np.random.default_rng(1)
    error = rng.random(200) < 0.3
    u = np.round(rng.random(200) + 0.5 * error, 1)  # rounded: ties included
    assert pixel_auroc(u, error) == pytest.approx(hand_auroc(u, error))
    assert pixel_auroc(error.astype(float), error) == 1.0
    assert np.isnan(pixel_auroc(u, np.zeros(200, bool)))


def test_uncertainty_error_overlap_against_every_threshold():
    rng = np.random.default_rng(2)
    error = rng.random(120) < 0.25
    u = np.round(rng.random(120) + 0.4 * error, 1)
    best = 0.0
    for threshold in [-np.inf, *np.unique(u)]:
        flagged = u > threshold
        best = max(best, 2 * np.sum(flagged & error) / (flagged.sum() + error.sum()))
    assert uncertainty_error_overlap(u, error) == pytest.approx(best)
    assert uncertainty_error_overlap(error.astype(float), error) == 1.0


def test_risk_coverage_aurc_and_spearman_by_hand():
    u = [0.3, 0.1, 0.4, 0.2]
    risk = [0.5, 0.1, 0.2, 0.0]
    # most certain first: risks 0.1, 0.0, 0.5, 0.2 -> running means 0.1, 0.05, 0.2, 0.2
    coverage, curve = risk_coverage(u, risk)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve, [0.1, 0.05, 0.2, 0.2])
    assert aurc(u, risk) == pytest.approx((0.1 + 0.05 + 0.2 + 0.2) / 4)
    # ranks of u: 3 1 4 2; of risk: 4 2 3 1; d = -1 -1 1 1; rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert case_spearman(u, risk) == pytest.approx(0.6)
    assert case_spearman(u + [0.9], risk + [float("nan")]) == pytest.approx(0.6)  # NaN cases left out


def test_pairwise_dice_by_hand():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:2, :3] = True  # 6 pixels, 4 shared with a
    empty = np.zeros((4, 4), bool)
    # a-b: 2 * 4 / 10 = 0.8; a-empty and b-empty: 0
    assert pairwise_dice([a, b, empty]) == pytest.approx(0.8 / 3)
    assert pairwise_dice([empty, empty]) == 1.0  # two empty masks agree
    assert pairwise_dice([a, a, a]) == 1.0
    assert np.isnan(pairwise_dice([a]))


def test_members_pairwise_dice_is_a_case_level_source(tmp_path):
    """Samples written as nnDiffSeg_predict --save_samples does: the case's uncertainty is 1 - the mean Dice
    between its members, ranked against its 1 - Dice (no pixel metrics), next to the maps' sources."""
    ref_dir, pred_dir, _ = _folders(tmp_path, num_cases=4, with_probabilities=False, with_spread=False)
    hand = []
    for i in range(4):
        pred = np.array(Image.open(pred_dir / f"case{i}.png"))
        members = [pred.copy() for _ in range(3)]
        members[1][:i + 1, :] = 1  # 1, 2, 3 and 4 rows added
        for k, member in enumerate(members):
            _write_case(pred_dir / "samples" / f"sample_{k}", f"case{i}", member)
        hand.append(1 - pairwise_dice([m == 1 for m in members]))
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    block = summary["uncertainty"]["pairwise_dice"]
    assert block["case_mean_uncertainty"] == pytest.approx(hand)
    risks = [1 - c["mean"]["dice"] for c in summary["cases"]]
    assert block["all_labels"]["aurc"] == pytest.approx(aurc(hand, risks))
    assert block["all_labels"]["case_spearman"] == pytest.approx(case_spearman(hand, risks))
    assert block["per_class"]["1"]["aurc"] == pytest.approx(aurc(hand, risks))  # one label: the same
    assert np.isnan(block["all_labels"]["pixel_auroc"])
    assert Image.open(pred_dir / "summary_figures" / "risk_coverage.png").size[0] >= 700
    result = subprocess.run([sys.executable, "-m", "nndiffseg.evaluation.evaluate", "-ref", str(ref_dir), "-pred",
                             str(pred_dir), "-np", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pairwise_dice, all labels" in result.stdout


def test_normalized_entropy():
    probabilities = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    expected = [0.0, np.log(2) / np.log(3), 1.0]
    np.testing.assert_allclose(normalized_entropy(probabilities), expected, atol=1e-6)


def _write_case(folder, name, labels):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(folder / f"{name}.png")


def _folders(tmp_path, num_cases=5, with_probabilities=True, with_spread=True):
    """Cases whose errors sit where the spread is high and the probabilities say 0.6."""
    rng = np.random.default_rng(3)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    expected = {"p": [], "y": [], "u": [], "err": []}
    for i in range(num_cases):
        ref = np.zeros((16, 20), np.uint8)
        ref[4:10, 5:12] = 1
        pred = ref.copy()
        wrong = rng.random(ref.shape) < 0.05 * (i + 1)
        pred[wrong] = 1 - pred[wrong]
        _write_case(ref_dir, f"case{i}", ref)
        _write_case(pred_dir, f"case{i}", pred)
        p1 = np.where(pred == 1, 0.6, 0.4) * wrong + np.where(pred == 1, 0.95, 0.05) * ~wrong
        if with_probabilities:
            np.savez_compressed(pred_dir / f"case{i}.npz", probabilities=np.stack([1 - p1, p1])[:, None])
        spread = np.where(wrong, 0.4, 0.02).astype(np.float32) + rng.random(ref.shape).astype(np.float32) * 0.01
        if with_spread:
            (pred_dir / "uncertainty").mkdir(exist_ok=True)
            np.savez_compressed(pred_dir / "uncertainty" / f"case{i}.npz", uncertainty=spread[None])
        expected["p"] += list(p1.ravel())
        expected["y"] += list((ref == 1).ravel())
        expected["u"] += list(spread.ravel())
        expected["err"] += list(wrong.ravel())
    return ref_dir, pred_dir, expected


def test_evaluate_folders_scores_probabilities_and_uncertainty(tmp_path):
    ref_dir, pred_dir, expected = _folders(tmp_path)
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    calibration = summary["calibration"]["per_class"]["1"]
    assert calibration["ece"] == pytest.approx(hand_ece(expected["p"], expected["y"]))
    assert calibration["brier"] == pytest.approx(np.mean((np.array(expected["p"]) - expected["y"]) ** 2))
    spread = summary["uncertainty"]["spread"]["all_labels"]
    assert spread["pixel_auroc"] == pytest.approx(1.0)  # every wrong pixel has the higher spread
    assert spread["uncertainty_error_overlap"] == pytest.approx(1.0)
    # more errors in later cases, and their mean spread grows with them: a perfect case ranking
    assert spread["case_spearman"] == pytest.approx(1.0)
    risks = [1 - c["mean"]["dice"] for c in summary["cases"]]
    assert spread["aurc"] == pytest.approx(np.mean(np.cumsum(sorted(risks)) / np.arange(1, 6)))
    entropy = summary["uncertainty"]["entropy"]["all_labels"]
    assert entropy["pixel_auroc"] == pytest.approx(1.0)  # 0.6 / 0.4 is less sure than 0.95 / 0.05
    assert [c["mean_uncertainty"]["spread"] for c in summary["cases"]] == \
        pytest.approx(summary["uncertainty"]["spread"]["case_mean_uncertainty"])
    written = json.loads((pred_dir / "summary.json").read_text())
    assert written["uncertainty"]["spread"]["all_labels"]["pixel_auroc"] == pytest.approx(1.0)
    for picture in ("calibration.png", "risk_coverage.png"):
        assert Image.open(pred_dir / "summary_figures" / picture).size[0] >= 700


def test_evaluate_without_probabilities_has_no_uncertainty_blocks(tmp_path):
    ref_dir, pred_dir, _ = _folders(tmp_path, with_probabilities=False, with_spread=False)
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert "calibration" not in summary and "uncertainty" not in summary
    assert not (pred_dir / "summary_figures").exists()


@pytest.mark.parametrize("problem", ["shape", "missing", "corrupt"])
def test_bad_probability_files_are_named_and_nothing_is_written(tmp_path, problem):
    ref_dir, pred_dir, _ = _folders(tmp_path, with_spread=False)
    bad = pred_dir / "case2.npz"
    if problem == "shape":
        np.savez_compressed(bad, probabilities=np.zeros((2, 1, 8, 8)))
        expected = "does not fit the label map's shape (1, 16, 20)"
    elif problem == "missing":
        bad.unlink()
        expected = "1 case(s) have no probability .npz"
    else:
        bad.write_bytes(b"not a zip file")
        expected = "could not read"
    with pytest.raises(NnDiffSegError) as e:
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert expected in str(e.value) and ("case2" in str(e.value))
    assert not (pred_dir / "summary.json").exists() and not (pred_dir / "summary_figures").exists()


def test_cli_prints_calibration_and_failure_detection(tmp_path):
    ref_dir, pred_dir, _ = _folders(tmp_path)
    result = subprocess.run([sys.executable, "-m", "nndiffseg.evaluation.evaluate", "-ref", ref_dir, "-pred", pred_dir,
                             "-np", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ECE" in result.stdout and "spread, all labels" in result.stdout and "entropy, class 1" in result.stdout
