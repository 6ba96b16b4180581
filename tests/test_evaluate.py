"""Metrics (Dice, IoU, tolerant IoU) and the nnDiffSeg_evaluate folder evaluation / CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.evaluate import evaluate_folders, format_table
from nndiffseg.evaluation.metrics import compute_case_metrics, dice, iou, tolerant_iou

SQUARE = np.ones((3, 3), dtype=bool)


def square(shape, rows, cols):
    """Boolean mask with True in rows[0]..rows[1] and cols[0]..cols[1] (inclusive)."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return mask


# --------------------------------------------------------------------------- metrics on hand-computed masks

# G: 4x4 square at rows/cols 2..5; P: the same square shifted by 2 rows and 2 columns (rows/cols 4..7).
G_SQ = square((12, 12), (2, 5), (2, 5))
P_SHIFTED = square((12, 12), (4, 7), (4, 7))
# |G| = |P| = 16, |P ∩ G| = rows/cols 4..5 = 2*2 = 4, |P ∪ G| = 16 + 16 - 4 = 28.
# dilate(G) = rows/cols 1..6, so |P ∩ dilate(G)| = rows/cols 4..6 = 3*3 = 9.
# erode(G) = rows/cols 3..4 (4 pixels), of which only (4, 4) lies in P: |erode(G) ∪ P| = 16 + 3 = 19.
SHIFTED_DICE = 2 * 4 / (16 + 16)
SHIFTED_IOU = 4 / 28
SHIFTED_TIOU = 9 / 19


def test_overlapping_squares_by_hand():
    assert dice(P_SHIFTED, G_SQ) == pytest.approx(SHIFTED_DICE)
    assert iou(P_SHIFTED, G_SQ) == pytest.approx(SHIFTED_IOU)
    assert tolerant_iou(P_SHIFTED, G_SQ) == pytest.approx(SHIFTED_TIOU)


def test_diagonal_one_pixel_shift_is_tolerated():
    # Shift by one row and column: P ∩ G = 3*3 = 9, so Dice = 18/32 and IoU = 9/23; but P lies inside
    # dilate(G) (rows/cols 1..6) and erode(G) (rows/cols 3..4) lies inside P, so tIoU = 16/16.
    pred = square((12, 12), (3, 6), (3, 6))
    assert dice(pred, G_SQ) == pytest.approx(18 / 32)
    assert iou(pred, G_SQ) == pytest.approx(9 / 23)
    assert tolerant_iou(pred, G_SQ) == 1.0


def test_dilated_prediction_has_tiou_one():
    pred = ndimage.binary_dilation(G_SQ, structure=SQUARE)  # 6x6 = 36 pixels
    assert tolerant_iou(pred, G_SQ) == 1.0
    assert dice(pred, G_SQ) == pytest.approx(2 * 16 / (36 + 16))
    assert dice(pred, G_SQ) < 1


def test_eroded_prediction_has_tiou_one():
    pred = ndimage.binary_erosion(G_SQ, structure=SQUARE)  # 2x2 = 4 pixels
    assert tolerant_iou(pred, G_SQ) == 1.0
    assert iou(pred, G_SQ) == pytest.approx(4 / 16)


def test_two_pixel_dilation_is_not_tolerated():
    pred = ndimage.binary_dilation(G_SQ, structure=SQUARE, iterations=2)  # 8x8 = 64 pixels
    # P ∩ dilate(G) = dilate(G) = 36 pixels; erode(G) ⊆ P, so the denominator is |P| = 64.
    assert tolerant_iou(pred, G_SQ) == pytest.approx(36 / 64)


def test_tolerance_includes_diagonals():
    ref = np.zeros((5, 5), dtype=bool)
    ref[2, 2] = True
    pred = np.zeros((5, 5), dtype=bool)
    pred[1, 1] = True  # diagonal neighbour: inside a 3x3 square dilation, not a cross-shaped one
    # numerator |P ∩ dilate(G)| = 1; erode(G) is empty, so the denominator is |P| = 1.
    assert tolerant_iou(pred, ref) == 1.0
    assert iou(pred, ref) == 0.0


def test_erosion_treats_outside_as_background():
    ref = np.ones((3, 3), dtype=bool)  # touches the border everywhere
    pred = np.zeros((3, 3), dtype=bool)
    pred[1, 1] = True
    # Outside = background: erode(G) = {centre}, so tIoU = |{centre}| / |{centre}| = 1. (Were the
    # outside foreground, erode(G) would be all 9 pixels and tIoU would be 1/9.)
    assert tolerant_iou(pred, ref) == 1.0


def test_3d_masks_are_processed_per_slice_along_first_axis():
    ref = np.zeros((3, 7, 7), dtype=bool)
    ref[1, 2:5, 2:5] = True  # 9 pixels in slice 1
    pred = ref.copy()
    pred[0, 2:5, 2:5] = True  # the same square in the neighbouring slice 0
    # Per slice: dilate(G) stays in slice 1 -> |P ∩ dilate(G)| = 9; erode(G) = slice 1's centre pixel,
    # already in P -> |erode(G) ∪ P| = 18. A 3x3x3 element would reach slice 0 and give 18/18.
    assert tolerant_iou(pred, ref) == pytest.approx(9 / 18)
    # Slice by slice, a 3D stack scores like its 2D content.
    stacked_pred = np.stack([P_SHIFTED, P_SHIFTED])
    stacked_ref = np.stack([G_SQ, G_SQ])
    assert tolerant_iou(stacked_pred, stacked_ref) == pytest.approx(SHIFTED_TIOU)


@pytest.mark.parametrize("metric", [dice, iou, tolerant_iou])
def test_empty_combinations(metric):
    empty = np.zeros((8, 8), dtype=bool)
    blob = square((8, 8), (2, 5), (2, 5))
    assert math.isnan(metric(empty, empty))  # both empty: undefined
    assert metric(blob, empty) == 0.0  # reference empty, prediction not (no Dice = 1 here)
    assert metric(empty, blob) == 0.0  # prediction empty, reference not
    assert metric(blob, blob) == 1.0  # neither empty


def test_tiou_zero_when_denominator_empty():
    ref = np.zeros((8, 8), dtype=bool)
    ref[4, 4] = True  # erode(G) is empty
    pred = np.zeros((8, 8), dtype=bool)
    assert tolerant_iou(pred, ref) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_tiou_at_least_iou_on_random_shapes():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(150):
        shape = (24, 24) if trial % 2 else (3, 16, 16)
        ref = ndimage.gaussian_filter(rng.random(shape), 1.5) > rng.uniform(0.45, 0.55)
        pred = ndimage.gaussian_filter(rng.random(shape), 1.5) > rng.uniform(0.45, 0.55)
        if not ref.any() and not pred.any():
            continue
        i, t = iou(pred, ref), tolerant_iou(pred, ref)
        assert i - 1e-12 <= t <= 1 + 1e-12, (trial, i, t)
        checked += 1
    assert checked > 100


def test_compute_case_metrics_on_label_maps():
    ref = G_SQ.astype(np.uint8) + 2 * square((12, 12), (8, 10), (0, 2))
    pred = P_SHIFTED.astype(np.uint8)
    result = compute_case_metrics(pred, ref, [1, 2, 3])
    assert set(result) == {1, 2, 3}
    assert result[1] == pytest.approx({"dice": SHIFTED_DICE, "iou": SHIFTED_IOU, "tiou": SHIFTED_TIOU})
    assert result[2] == {"dice": 0.0, "iou": 0.0, "tiou": 0.0}  # in the reference only
    assert all(math.isnan(v) for v in result[3].values())  # in neither


# --------------------------------------------------------------------------- folder evaluation

CLASS2_REF = square((12, 12), (8, 10), (0, 2))


def _case_maps() -> dict:
    """Reference and prediction label maps (2 foreground classes) with hand-known metrics."""
    g1 = G_SQ.astype(np.uint8)
    both = g1 + 2 * CLASS2_REF
    empty = np.zeros((12, 12), np.uint8)
    return {
        # a: perfect for both classes -> all 1.
        "case_a": (both, both),
        # b: class 1 shifted by 2 (SHIFTED_* values), class 2 in neither -> NaN.
        "case_b": (g1, P_SHIFTED.astype(np.uint8)),
        # c: class 1 perfect, class 2 missed -> 0.
        "case_c": (both, g1),
        # d: background only in both -> NaN for both classes.
        "case_d": (empty, empty),
    }


# Per class: nanmean over cases (class 1: a, b, c; class 2: a, c). Mean: average of the two classes.
EXPECTED_PER_CLASS = {
    "1": {"dice": (1 + SHIFTED_DICE + 1) / 3, "iou": (1 + SHIFTED_IOU + 1) / 3, "tiou": (1 + SHIFTED_TIOU + 1) / 3},
    "2": {"dice": (1 + 0) / 2, "iou": (1 + 0) / 2, "tiou": (1 + 0) / 2},
}
EXPECTED_MEAN = {m: (EXPECTED_PER_CLASS["1"][m] + EXPECTED_PER_CLASS["2"][m]) / 2 for m in ("dice", "iou", "tiou")}


def _write(arr: np.ndarray, path: Path) -> None:
    if path.name.endswith(".png"):
        Image.fromarray(arr.astype(np.uint8)).save(path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def make_folders(root: Path, ending: str, maps: dict | None = None) -> tuple[Path, Path]:
    """gt/ and pred/ folders; .nii.gz cases are 3D stacks of two identical slices (same ratios per slice)."""
    ref_dir, pred_dir = root / "gt", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for case, (ref, pred) in (maps or _case_maps()).items():
        if ending == ".nii.gz":
            ref, pred = np.stack([ref, ref]), np.stack([pred, pred])
        _write(ref, ref_dir / f"{case}{ending}")
        _write(pred, pred_dir / f"{case}{ending}")
    return ref_dir, pred_dir


def _add_clutter(folder: Path) -> None:
    """Files the evaluation must ignore: stale summary, npz of no case, pkl, PNG overlays in a subfolder
    (probabilities of the cases themselves are scored: tests/test_uncertainty_metrics.py)."""
    (folder / "summary.json").write_text("{\"stale\": true}")
    np.savez(folder / "case_zz.npz", probabilities=np.zeros(3))
    (folder / "case_a.pkl").write_bytes(b"not an image")
    (folder / "overlays").mkdir()
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(folder / "overlays" / "case_zzz.png")
    (folder / "odd_folder.png").mkdir()  # a folder, even with an image ending, is not a case


def _nan_as_null(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_as_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_as_null(v) for v in obj]
    return obj


def _check_expected(summary: dict) -> None:
    assert summary["labels"] == [1, 2]
    assert summary["num_cases"] == 4
    assert summary["num_nan"] == {"1": 1, "2": 2}
    assert set(summary["per_class"]) == {"1", "2"}
    for label in ("1", "2"):
        assert summary["per_class"][label] == pytest.approx(EXPECTED_PER_CLASS[label])
    assert summary["mean"] == pytest.approx(EXPECTED_MEAN)
    cases = {c["case"]: c for c in summary["cases"]}
    assert [c["case"] for c in summary["cases"]] == ["case_a", "case_b", "case_c", "case_d"]
    assert cases["case_b"]["metrics"]["1"] == pytest.approx(
        {"dice": SHIFTED_DICE, "iou": SHIFTED_IOU, "tiou": SHIFTED_TIOU})
    assert cases["case_b"]["mean"] == pytest.approx({"dice": SHIFTED_DICE, "iou": SHIFTED_IOU, "tiou": SHIFTED_TIOU})
    assert cases["case_c"]["metrics"]["2"] == {"dice": 0.0, "iou": 0.0, "tiou": 0.0}
    assert cases["case_c"]["mean"] == pytest.approx({"dice": 0.5, "iou": 0.5, "tiou": 0.5})
    assert cases["case_a"]["mean"] == {"dice": 1.0, "iou": 1.0, "tiou": 1.0}


@pytest.mark.parametrize("ending", [".png", ".nii.gz"])
def test_evaluate_folders_values_and_json(tmp_path, ending):
    ref_dir, pred_dir = make_folders(tmp_path, ending)
    _add_clutter(pred_dir)
    _add_clutter(ref_dir)
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    _check_expected(summary)
    case_b = summary["cases"][1]
    assert all(math.isnan(v) for v in case_b["metrics"]["2"].values())
    assert case_b["reference_file"] == str((ref_dir / f"case_b{ending}").resolve())
    assert case_b["prediction_file"] == str((pred_dir / f"case_b{ending}").resolve())

    # Default output location: PRED_FOLDER/summary.json, replacing the stale one; NaN written as null.
    text = (pred_dir / "summary.json").read_text()
    assert "NaN" not in text
    on_disk = json.loads(text)
    assert {"mean", "per_class", "cases"} <= set(on_disk)
    assert set(on_disk["mean"]) == {"dice", "iou", "tiou"}
    assert set(on_disk["cases"][0]) >= {"case", "reference_file", "prediction_file", "metrics", "mean"}
    assert on_disk["cases"][1]["metrics"]["2"] == {"dice": None, "iou": None, "tiou": None}
    assert on_disk["cases"][3]["mean"] == {"dice": None, "iou": None, "tiou": None}
    assert on_disk == _nan_as_null(summary)
    assert (ref_dir / "summary.json").read_text() == "{\"stale\": true}"  # the reference folder is untouched


def test_explicit_output_and_labels(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    out = tmp_path / "results" / "eval.json"
    summary = evaluate_folders(str(ref_dir), str(pred_dir), output_file=str(out), labels=[1], num_processes=1)
    assert not (pred_dir / "summary.json").exists()
    assert json.loads(out.read_text())["per_class"].keys() == {"1"}
    assert summary["labels"] == [1]
    assert summary["mean"] == pytest.approx(EXPECTED_PER_CLASS["1"])
    # A requested label present nowhere: NaN for that class, left out of the overall mean.
    summary = evaluate_folders(str(ref_dir), str(pred_dir), output_file=str(out), labels=[1, 5], num_processes=1)
    assert all(math.isnan(v) for v in summary["per_class"]["5"].values())
    assert summary["num_nan"]["5"] == 4
    assert summary["mean"] == pytest.approx(EXPECTED_PER_CLASS["1"])
    with pytest.raises(NnDiffSegError, match="background"):
        evaluate_folders(str(ref_dir), str(pred_dir), output_file=str(out), labels=[0, 1], num_processes=1)


def test_labels_found_only_in_predictions_are_scored(tmp_path):
    maps = _case_maps()
    ref, pred = maps["case_d"]
    pred = pred.copy()
    pred[0, 0] = 3  # a spurious class-3 pixel in a background-only case
    maps["case_d"] = (ref, pred)
    ref_dir, pred_dir = make_folders(tmp_path, ".png", maps)
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert summary["labels"] == [1, 2, 3]
    assert summary["cases"][3]["metrics"]["3"] == {"dice": 0.0, "iou": 0.0, "tiou": 0.0}
    assert math.isnan(summary["cases"][0]["metrics"]["3"]["dice"])
    assert summary["per_class"]["3"] == {"dice": 0.0, "iou": 0.0, "tiou": 0.0}
    assert summary["num_nan"]["3"] == 3


def test_parallel_matches_sequential(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".nii.gz")
    out1, out2 = tmp_path / "seq.json", tmp_path / "par.json"
    evaluate_folders(str(ref_dir), str(pred_dir), output_file=str(out1), num_processes=1)
    summary = evaluate_folders(str(ref_dir), str(pred_dir), output_file=str(out2), num_processes=2)
    _check_expected(summary)
    assert out1.read_text() == out2.read_text()


def test_mixed_formats_matched_by_case_name(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    # The same 2D prediction as a .nii.gz (SimpleITK reads 2D as shape (1, X, Y), like the PNG reader).
    arr = np.asarray(Image.open(pred_dir / "case_b.png"))
    (pred_dir / "case_b.png").unlink()
    _write(arr, pred_dir / "case_b.nii.gz")
    summary = evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    _check_expected(summary)


def test_missing_extra_and_empty_are_errors(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    (pred_dir / "case_c.png").unlink()
    with pytest.raises(NnDiffSegError, match="case_c") as info:
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert "no prediction" in str(info.value)
    (pred_dir / "case_c.png").write_bytes((ref_dir / "case_c.png").read_bytes())
    (pred_dir / "case_x.png").write_bytes((ref_dir / "case_c.png").read_bytes())
    with pytest.raises(NnDiffSegError, match="case_x") as info:
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert "no reference" in str(info.value)
    assert not (pred_dir / "summary.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(NnDiffSegError, match="no label maps"):
        evaluate_folders(str(ref_dir), str(empty), num_processes=1)
    with pytest.raises(NnDiffSegError, match="not found"):
        evaluate_folders(str(ref_dir), str(tmp_path / "nope"), num_processes=1)


def test_background_only_needs_explicit_labels(tmp_path):
    empty = np.zeros((6, 6), np.uint8)
    ref_dir, pred_dir = make_folders(tmp_path, ".png", {"c1": (empty, empty), "c2": (empty, empty)})
    with pytest.raises(NnDiffSegError, match="no foreground labels"):
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert not (pred_dir / "summary.json").exists()
    summary = evaluate_folders(str(ref_dir), str(pred_dir), labels=[1], num_processes=1)
    assert math.isnan(summary["mean"]["dice"]) and summary["num_nan"] == {"1": 2}
    assert json.loads((pred_dir / "summary.json").read_text())["mean"] == {"dice": None, "iou": None, "tiou": None}
    with pytest.raises(NnDiffSegError, match="at least 1"):
        evaluate_folders(str(ref_dir), str(pred_dir), labels=[1], num_processes=0)


def test_shape_mismatch_names_case_and_shapes(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    _write(np.zeros((12, 13), np.uint8), pred_dir / "case_c.png")
    for np_ in (1, 2):
        with pytest.raises(NnDiffSegError) as info:
            evaluate_folders(str(ref_dir), str(pred_dir), num_processes=np_)
        message = str(info.value)
        assert "case_c" in message and "(1, 12, 12)" in message and "(1, 12, 13)" in message
    assert not (pred_dir / "summary.json").exists()


def test_rgb_image_is_not_a_label_map(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(pred_dir / "case_a.png")
    with pytest.raises(NnDiffSegError, match="case_a.png.*channels"):
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)


def test_failed_write_keeps_old_summary(tmp_path, monkeypatch):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    (pred_dir / "summary.json").write_text("old")

    def broken_write(path, text, *args, **kwargs):  # the disk fills half-way through the summary
        with open(path, "w") as f:
            f.write(text[:len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)
    assert (pred_dir / "summary.json").read_text() == "old"
    assert sorted(p.name for p in pred_dir.iterdir()) == ["case_a.png", "case_b.png", "case_c.png", "case_d.png",
                                                         "summary.json"]


def test_format_table(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    lines = format_table(evaluate_folders(str(ref_dir), str(pred_dir), num_processes=1)).splitlines()
    rows = {line.split()[0] if not line.startswith("class") else " ".join(line.split()[:2]): line.split()[-3:]
            for line in lines if line[:1].isalnum() and not line.startswith("case (")}
    assert rows["case_a"] == ["1.0000", "1.0000", "1.0000"]
    assert rows["case_b"] == [f"{SHIFTED_DICE:.4f}", f"{SHIFTED_IOU:.4f}", f"{SHIFTED_TIOU:.4f}"]
    assert rows["case_d"] == ["nan", "nan", "nan"]
    assert rows["class 2"] == ["0.5000", "0.5000", "0.5000"]
    assert rows["mean"] == [f"{EXPECTED_MEAN[m]:.4f}" for m in ("dice", "iou", "tiou")]
    data_lines = [line for line in lines if not line.startswith("-")]
    assert len({len(line) for line in data_lines}) == 1  # fixed-width columns


# --------------------------------------------------------------------------- CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nndiffseg.evaluation.evaluate", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_table_and_writes_summary(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    result = run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-np", "1")
    assert result.returncode == 0, result.stderr
    assert "case_b" in result.stdout and f"{SHIFTED_TIOU:.4f}" in result.stdout
    assert f"{EXPECTED_MEAN['dice']:.4f}" in result.stdout
    assert json.loads((pred_dir / "summary.json").read_text())["mean"] == pytest.approx(EXPECTED_MEAN)

    out = tmp_path / "other.json"
    result = run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-o", str(out), "-l", "2", "-np", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["mean"] == pytest.approx(EXPECTED_PER_CLASS["2"])


@pytest.mark.parametrize("problem", ["missing", "extra"])
def test_cli_case_mismatch_fails_cleanly(tmp_path, problem):
    ref_dir, pred_dir = make_folders(tmp_path, ".png")
    if problem == "missing":
        (pred_dir / "case_c.png").unlink()
        name = "case_c"
    else:
        (pred_dir / "case_extra.png").write_bytes((pred_dir / "case_a.png").read_bytes())
        name = "case_extra"
    result = run_cli("-ref", str(ref_dir), "-pred", str(pred_dir), "-np", "1")
    assert result.returncode != 0
    assert result.stderr.startswith("ERROR:") and name in result.stderr
    assert "Traceback" not in result.stderr
    assert not (pred_dir / "summary.json").exists()
