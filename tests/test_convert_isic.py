"""nnDiffSeg_convert_isic: real-sample conversions (2017 in place, 2016/2018 rearranged in tmp_path), byte-identical
re-runs, and every refused input run through the CLI with nothing left under nnUNet_raw."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import assert_refused
from PIL import Image

from nndiffseg.dataset_conversion.common import DatasetConversionError
from nndiffseg.dataset_conversion.isic import convert_isic, detect_isic_layout

TRAIN_2017 = ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth")
NEAREST = Image.Resampling.NEAREST


# ---------------------------------------------------------------------------------------------- helpers

def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nndiffseg.dataset_conversion.isic", *args],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)


def sample_ids(sample: Path, n: int | None = None) -> list[str]:
    ids = sorted(p.stem for p in (sample / TRAIN_2017[0]).glob("ISIC_*.jpg"))
    return ids if n is None else ids[:n]


def copy_sample_pairs(sample: Path, ids: list[str], image_dir: Path, mask_dir: Path | None, suffix: str) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copy(sample / TRAIN_2017[0] / f"{cid}.jpg", image_dir)
        if mask_dir is not None:
            mask_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample / TRAIN_2017[1] / f"{cid}_segmentation.png", mask_dir / f"{cid}{suffix}")


def make_pair(image_dir: Path, mask_dir: Path | None, number: int, size=(40, 30), suffix="_segmentation.png",
              mask_size=None, mask_values=(0, 255)) -> tuple[Path, Path | None]:
    """A small generated case: noise JPEG and a rectangle mask of ``mask_values``."""
    cid = f"ISIC_{number:07d}"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(number)
    image_path = image_dir / f"{cid}.jpg"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image_path, quality=95)
    if mask_dir is None:
        return image_path, None
    mask_dir.mkdir(parents=True, exist_ok=True)
    w, h = mask_size or size
    mask = np.full((h, w), mask_values[0], np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = mask_values[1]
    mask_path = mask_dir / f"{cid}{suffix}"
    Image.fromarray(mask).save(mask_path)
    return image_path, mask_path


def make_2017(src: Path, numbers=(1, 2, 3)) -> Path:
    for n in numbers:
        make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], n)
    return src


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ---------------------------------------------------------------------------------------------- real ISIC 2017 sample

@pytest.fixture(scope="module")
def converted_2017(isic2017_sample, module_tmp):
    """The whole real sample converted in place at max_size 128 (2 processes); with the source hashes before."""
    raw = module_tmp("raw")
    before = tree_hashes(isic2017_sample)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(raw))
        folder = convert_isic(isic2017_sample, 17, max_size=128, num_processes=2)
    return folder, before


def test_2017_sample_files_and_dataset_json(converted_2017, isic2017_sample):
    folder, _ = converted_2017
    ids = sample_ids(isic2017_sample)
    assert folder.name == "Dataset017_ISIC2017"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in ids]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.png" for c in ids]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == len(ids) == 69
    assert meta["file_ending"] == ".png"
    assert "CC-0" in meta["licence"] and "CC-BY-NC" in meta["licence"]
    assert "Codella" in meta["reference"] and meta["converted_by"] == "nnDiffSeg_convert_isic"


def test_2017_sample_pixels(converted_2017, isic2017_sample):
    folder, _ = converted_2017
    for cid in sample_ids(isic2017_sample):
        with Image.open(folder / "imagesTr" / f"{cid}_0000.png") as image, \
                Image.open(folder / "labelsTr" / f"{cid}.png") as label:
            assert image.mode == "RGB" and label.mode == "L"
            assert image.size == label.size and max(image.size) == 128
            assert set(np.unique(np.asarray(label)).tolist()) <= {0, 1}
    all_values = np.unique(np.concatenate([read_png(p).ravel() for p in (folder / "labelsTr").iterdir()]))
    assert all_values.tolist() == [0, 1]

    cid = sample_ids(isic2017_sample)[0]
    label = read_png(folder / "labelsTr" / f"{cid}.png")
    with Image.open(isic2017_sample / TRAIN_2017[1] / f"{cid}_segmentation.png") as mask:
        expected = np.asarray(mask.resize((label.shape[1], label.shape[0]), NEAREST)) == 255
    np.testing.assert_array_equal(label, expected.astype(np.uint8))
    with Image.open(isic2017_sample / TRAIN_2017[0] / f"{cid}.jpg") as jpg:
        expected_image = np.asarray(jpg.resize((label.shape[1], label.shape[0]), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(read_png(folder / "imagesTr" / f"{cid}_0000.png"), expected_image)


def test_2017_sample_readable_by_nnunet(converted_2017, isic2017_sample):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    folder, _ = converted_2017
    cid = sample_ids(isic2017_sample)[0]
    image, _ = NaturalImage2DIO().read_images([str(folder / "imagesTr" / f"{cid}_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(folder / "labelsTr" / f"{cid}.png"))
    assert image.shape[:2] == (3, 1) and seg.shape[:2] == (1, 1) and image.shape[2:] == seg.shape[2:]


def test_2017_sample_source_unchanged(converted_2017, isic2017_sample):
    _, before = converted_2017
    assert tree_hashes(isic2017_sample) == before


def test_2017_default_size_and_original_size(isic2017_sample, nnunet_env, tmp_path):
    cid = sample_ids(isic2017_sample)[0]
    src = tmp_path / "src"
    copy_sample_pairs(isic2017_sample, [cid], src / TRAIN_2017[0], src / TRAIN_2017[1], "_segmentation.png")
    jpg_path, mask_path = src / TRAIN_2017[0] / f"{cid}.jpg", src / TRAIN_2017[1] / f"{cid}_segmentation.png"
    with Image.open(jpg_path) as jpg, Image.open(mask_path) as mask:
        jpg_pixels, mask_pixels, original_size = np.asarray(jpg), np.asarray(mask), jpg.size

    result = run_cli("-i", str(src), "-d", "1")  # default --max_size
    assert result.returncode == 0, result.stderr
    label = read_png(nnunet_env["nnUNet_raw"] / "Dataset001_ISIC2017" / "labelsTr" / f"{cid}.png")
    assert max(label.shape) == 512
    expected = np.asarray(Image.fromarray(mask_pixels).resize((label.shape[1], label.shape[0]), NEAREST)) == 255
    np.testing.assert_array_equal(label, expected.astype(np.uint8))

    folder = convert_isic(src, 2, max_size=0, num_processes=1)
    image = read_png(folder / "imagesTr" / f"{cid}_0000.png")
    assert (image.shape[1], image.shape[0]) == original_size
    np.testing.assert_array_equal(image, jpg_pixels)
    np.testing.assert_array_equal(read_png(folder / "labelsTr" / f"{cid}.png"), (mask_pixels == 255).astype(np.uint8))


def add_clutter(folder: Path, cid: str) -> int:
    """Files the converter must skip, as the releases ship them; returns how many."""
    shutil.copy(next(folder.glob("*.jpg")), folder / f"{cid}_superpixels.png")
    (folder / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age\n")
    (folder / "LICENSE.txt").write_text("CC-0\n")
    (folder / "ATTRIBUTION.txt").write_text("ISIC Archive\n")
    (folder / ".DS_Store").write_bytes(b"\0")
    return 5


def test_2016_layout_from_sample(isic2017_sample, nnunet_env, tmp_path, capsys):
    ids = sample_ids(isic2017_sample, 4)
    src = tmp_path / "isic2016"
    copy_sample_pairs(isic2017_sample, ids[:3], src / "ISBI2016_ISIC_Part1_Training_Data",
                      src / "ISBI2016_ISIC_Part1_Training_GroundTruth", "_Segmentation.png")
    copy_sample_pairs(isic2017_sample, ids[3:], src / "ISBI2016_ISIC_Part1_Test_Data",
                      src / "ISBI2016_ISIC_Part1_Test_GroundTruth", "_Segmentation.png")
    clutter = add_clutter(src / "ISBI2016_ISIC_Part1_Training_Data", ids[0])
    before = tree_hashes(src)

    layout = detect_isic_layout(src)
    assert layout.year == 2016
    assert [(s.name, s.images.name, s.masks.name) for s in layout.splits] == [
        ("Training", "ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
        ("Test", "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")]

    folder = convert_isic(src, 16, max_size=64, num_processes=1)
    assert folder == nnunet_env["nnUNet_raw"] / "Dataset016_ISIC2016"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in ids[:3]]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.png" for c in ids[:3]]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [f"{ids[3]}_0000.png"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{ids[3]}.png"]
    assert set(np.unique(read_png(folder / "labelsTs" / f"{ids[3]}.png")).tolist()) == {0, 1}
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["licence"] == "CC-0" and "1605.01397" in meta["reference"]
    out = capsys.readouterr().out
    assert "Training: 3 cases" in out and "Test: 1 cases" in out and f"skipped {clutter} files" in out
    assert tree_hashes(src) == before


def test_2018_layout_from_sample(isic2017_sample, nnunet_env, tmp_path, capsys):
    ids = sample_ids(isic2017_sample, 4)
    src = tmp_path / "isic2018"
    copy_sample_pairs(isic2017_sample, ids[:2], src / "ISIC2018_Task1-2_Training_Input",
                      src / "ISIC2018_Task1_Training_GroundTruth", "_segmentation.png")
    copy_sample_pairs(isic2017_sample, ids[2:3], src / "ISIC2018_Task1-2_Validation_Input",
                      src / "ISIC2018_Task1_Validation_GroundTruth", "_segmentation.png")
    copy_sample_pairs(isic2017_sample, ids[3:], src / "ISIC2018_Task1-2_Test_Input", None, "")  # no test GT

    layout = detect_isic_layout(src)
    assert layout.year == 2018
    assert [(s.name, s.masks is not None) for s in layout.splits] == [
        ("Training", True), ("Validation", True), ("Test", False)]

    folder = convert_isic(src, 18, max_size=64, num_processes=2)
    assert folder.name == "Dataset018_ISIC2018"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in ids[:3]]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.png" for c in ids[:3]]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [f"{ids[3]}_0000.png"]
    assert not (folder / "labelsTs").exists()
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["licence"] == "CC-BY-NC"
    assert "1902.03368" in meta["reference"] and "HAM10000" in meta["reference"]
    assert "Test: 1 cases -> imagesTs only (no labels" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- generated layouts

def test_2017_test_alias_and_unlabelled_validation(nnunet_env, tmp_path):
    src = make_2017(tmp_path / "src", (1, 2))
    make_pair(src / "ISIC-2017_Validation_Data", None, 3)
    make_pair(src / "ISIC-2017_Test_Data", src / "ISIC-2017_Test_Part1_GroundTruth", 4)
    layout = detect_isic_layout(src)
    assert [(s.name, s.images.name, s.masks and s.masks.name) for s in layout.splits] == [
        ("Training", TRAIN_2017[0], TRAIN_2017[1]), ("Validation", "ISIC-2017_Validation_Data", None),
        ("Test", "ISIC-2017_Test_Data", "ISIC-2017_Test_Part1_GroundTruth")]
    folder = convert_isic(src, 3, num_processes=1)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["ISIC_0000001_0000.png", "ISIC_0000002_0000.png"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["ISIC_0000003_0000.png", "ISIC_0000004_0000.png"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["ISIC_0000004.png"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


def test_grey_mask_stored_as_rgb_is_accepted(nnunet_env, tmp_path):
    src = make_2017(tmp_path / "src", (1,))
    mask_path = src / TRAIN_2017[1] / "ISIC_0000001_segmentation.png"
    grey = read_png(mask_path)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(mask_path)
    folder = convert_isic(src, 4, num_processes=1)
    np.testing.assert_array_equal(read_png(folder / "labelsTr" / "ISIC_0000001.png"), (grey == 255).astype(np.uint8))


def test_small_images_are_never_enlarged(nnunet_env, tmp_path):
    folder = convert_isic(make_2017(tmp_path / "src", (1,)), 5, max_size=512, num_processes=1)
    assert read_png(folder / "imagesTr" / "ISIC_0000001_0000.png").shape == (30, 40, 3)


def test_overwrite_rerun_is_byte_identical(nnunet_env, tmp_path):
    src = make_2017(tmp_path / "src", (1, 2, 3, 4))
    make_pair(src / "ISIC-2017_Test_v2_Data", src / "ISIC-2017_Test_v2_Part1_GroundTruth", 5, size=(90, 60))
    raw = nnunet_env["nnUNet_raw"]
    assert run_cli("-i", str(src), "-d", "6", "--max_size", "32", "-np", "1").returncode == 0
    first = tree_hashes(raw)
    (raw / "Dataset006_ISIC2017" / "imagesTr" / "stale_0000.png").write_bytes(b"old")
    result = run_cli("-i", str(src), "-d", "6", "--max_size", "32", "-np", "2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert tree_hashes(raw) == first
    assert [p.name for p in raw.iterdir()] == ["Dataset006_ISIC2017"]  # no staging leftovers


# ---------------------------------------------------------------------------------------------- refused inputs

def _missing_mask(src: Path) -> list[str]:
    make_2017(src, (1, 3))
    make_pair(src / TRAIN_2017[0], None, 2)
    return ["missing mask", str(src / TRAIN_2017[0] / "ISIC_0000002.jpg"),
            str(src / TRAIN_2017[1] / "ISIC_0000002_segmentation.png")]


def _mask_without_image(src: Path) -> list[str]:
    make_2017(src, (1,))
    image, mask = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 2)
    image.unlink()
    return ["mask without image", str(mask), "ISIC_0000002.jpg"]


def _size_mismatch(src: Path) -> list[str]:
    make_2017(src, (1, 2, 4))
    image, mask = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 3, size=(40, 30), mask_size=(41, 30))
    return ["size mismatch", str(image), str(mask), "40x30", "41x30"]


def _mask_values_0_1(src: Path) -> list[str]:
    make_2017(src, (1, 2))
    _, mask = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 3, mask_values=(0, 1))
    return [str(mask), "values 0, 1", "expected only 0"]


def _colour_mask(src: Path) -> list[str]:
    make_2017(src, (1, 2))
    _, mask = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 3)
    rgb = np.stack([read_png(mask)] * 3, axis=-1)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(mask)
    return [str(mask), "colour image"]


def _truncated_image(src: Path) -> list[str]:
    make_2017(src, (1, 2))
    image, _ = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 3, size=(400, 300))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return ["cannot read image", str(image), "truncated"]


def _corrupt_mask(src: Path) -> list[str]:
    make_2017(src, (1, 2))
    _, mask = make_pair(src / TRAIN_2017[0], src / TRAIN_2017[1], 3)
    mask.write_bytes(b"this is not a png")
    return ["cannot read mask", str(mask)]


def _unrecognised_layout(src: Path) -> list[str]:
    make_pair(src / "images", src / "masks", 1)
    return ["unrecognised layout", str(src), "images, masks", "ISBI2016_ISIC_Part1_Training_Data",
            "ISIC-2017_Training_Data", "ISIC-2017_Test_v2_Data", "ISIC2018_Task1-2_Training_Input",
            "ISIC2018_Task1_Training_GroundTruth"]


def _training_without_ground_truth(src: Path) -> list[str]:
    make_pair(src / "ISIC2018_Task1-2_Training_Input", None, 1)
    return ["no ground truth", str(src / "ISIC2018_Task1_Training_GroundTruth")]


def _missing_source(src: Path) -> list[str]:
    return [str(src), "does not exist"]


REFUSED = {
    "missing_mask": _missing_mask,
    "mask_without_image": _mask_without_image,
    "size_mismatch": _size_mismatch,
    "mask_values_0_1": _mask_values_0_1,
    "colour_mask": _colour_mask,
    "truncated_image": _truncated_image,
    "corrupt_mask": _corrupt_mask,
    "unrecognised_layout": _unrecognised_layout,
    "training_without_ground_truth": _training_without_ground_truth,
    "missing_source": _missing_source,
}


# errors found while converting pixels also run with -np 2: they must come back from the worker pool intact
@pytest.mark.parametrize("case,num_processes", [(case, "1") for case in sorted(REFUSED)] + [
    ("size_mismatch", "2"), ("mask_values_0_1", "2"), ("truncated_image", "2")])
def test_refused_input_leaves_nothing(case, num_processes, nnunet_env, tmp_path):
    src = tmp_path / "src"
    expected = REFUSED[case](src)
    before = tree_hashes(src) if src.exists() else {}
    result = run_cli("-i", str(src), "-d", "9", "--max_size", "16", "-np", num_processes)
    assert_refused(result, expected)
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []  # no dataset, no .partial staging folder
    if src.exists():
        assert tree_hashes(src) == before


def test_existing_target_is_untouched(nnunet_env, tmp_path):
    src = make_2017(tmp_path / "src", (1,))
    existing = nnunet_env["nnUNet_raw"] / "Dataset009_ISIC2017"
    (existing / "imagesTr").mkdir(parents=True)
    (existing / "imagesTr" / "keep_0000.png").write_bytes(b"precious")
    before = tree_hashes(nnunet_env["nnUNet_raw"])
    assert_refused(run_cli("-i", str(src), "-d", "9"), [str(existing), "already exists", "--overwrite"])
    assert tree_hashes(nnunet_env["nnUNet_raw"]) == before
    assert [p.name for p in nnunet_env["nnUNet_raw"].iterdir()] == ["Dataset009_ISIC2017"]


def test_api_raises_dataset_conversion_error(nnunet_env, tmp_path):
    with pytest.raises(DatasetConversionError, match="does not exist"):
        convert_isic(tmp_path / "nowhere", 1)
    with pytest.raises(DatasetConversionError, match="max_size"):
        convert_isic(make_2017(tmp_path / "src", (1,)), 1, max_size=-1)
