"""nnDiffSeg_convert_stroke2021 on the synthetic release (stroke2021_fixture) in its three layouts: labels pixel for
pixel against the fixture's truth, PNG and DICOM/HU images, splits, options, every refused input through the CLI with
nothing left under nnUNet_raw, and one plan/train/predict/evaluate run through the nnDiffSeg_ tools."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli import assert_refused, run_tool
from PIL import Image

from nndiffseg.dataset_conversion.common import DatasetConversionError
from nndiffseg.dataset_conversion.stroke2021 import (
    LEAKAGE_WARNING,
    convert_stroke2021,
    detect_stroke2021_layout,
    fold_name,
)
from nndiffseg.dataset_conversion.stroke2021_fixture import (
    HEMORRHAGE_COLOUR,
    ISCHEMIA_COLOUR,
    MINISTRY_NONSTROKE_PNG,
    overlay_rgba,
    write_stroke2021_fixture,
)

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

MODULE = "nndiffseg.dataset_conversion.stroke2021"
LABELS = {"background": 0, "ischemic": 1, "hemorrhagic": 2}


# ---------------------------------------------------------------------------------------------- helpers

def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def read_nifti(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def case_ids(folder: Path, ending: str) -> list[str]:
    return sorted(n[: -len(ending)] for n in names(folder))


def all_labels(dataset: Path, ending: str = ".png") -> dict[str, Path]:
    return {p.name[: -len(ending)]: p for part in ("labelsTr", "labelsTs") for p in (dataset / part).glob(f"*{ending}")}


def assert_labels_match_truth(dataset: Path, fixture, categories=("ischemic", "hemorrhagic")) -> None:
    labels = all_labels(dataset)
    expected = sorted(c for cat in categories for c in fixture.ids(cat))
    assert sorted(labels) == expected
    for case_id, path in labels.items():
        np.testing.assert_array_equal(read_png(path), fixture.slices[case_id].label, err_msg=case_id)


def make(tmp_path: Path, layout: str, name: str = "src", **kwargs):
    kwargs = {"num_ischemic": 4, "num_hemorrhagic": 4, "num_nonstroke": 2, "size": 48, **kwargs}
    return write_stroke2021_fixture(tmp_path / name, layout, **kwargs)


# ---------------------------------------------------------------------------------------------- layouts

def test_competition_layout_png_images_labels_and_dataset_json(nnunet_env, tmp_path, capsys):
    fixture = make(tmp_path, "competition", num_ischemic=10, num_hemorrhagic=10)
    before = tree_hashes(fixture.source)
    assert detect_stroke2021_layout(fixture.source).kind == "competition"

    dataset = convert_stroke2021(fixture.source, 21, num_processes=2)
    assert dataset == nnunet_env["nnUNet_raw"] / "Dataset021_Stroke2021"
    assert names(dataset) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs", "splits_final.json"]
    assert_labels_match_truth(dataset, fixture)
    for part in ("Tr", "Ts"):
        assert case_ids(dataset / f"images{part}", "_0000.png") == case_ids(dataset / f"labels{part}", ".png")
        for path in (dataset / f"images{part}").iterdir():
            image = read_png(path)
            assert image.ndim == 2 and image.dtype == np.uint8  # one grey channel, the windowed slice itself
            np.testing.assert_array_equal(image, fixture.slices[path.name[:-len("_0000.png")]].png)
    assert set(np.unique(read_png(next((dataset / "labelsTr").iterdir()))).tolist()) <= {0, 1, 2}

    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "windowed CT"}
    assert meta["labels"] == LABELS
    assert meta["file_ending"] == ".png"
    assert meta["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    assert meta["numTraining"] == len(names(dataset / "imagesTr")) == 18
    assert "TEKNOFEST" in meta["reference"] and "patient" in meta["description"]

    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-8:] for line in out.splitlines()[2:6]}
    lesion_px = {c: sum(int((fixture.slices[i].label == c).sum()) for i in fixture.slices) for c in (1, 2)}
    # found, written, train, val, test, skipped, label-1 px, label-2 px
    assert rows["ischemic"] == ["10", "10", "8", "1", "1", "0", str(lesion_px[1]), "0"]
    assert rows["hemorrhagic"] == ["10", "10", "8", "1", "1", "0", "0", str(lesion_px[2])]
    assert rows["non-stroke"] == ["2", "-", "-", "-", "-", "-", "-", "-"]
    assert rows["total"] == ["20", "20", "16", "2", "2", "0", str(lesion_px[1]), str(lesion_px[2])]
    assert LEAKAGE_WARNING in out
    assert "TRAINING/ISKEMI/MASK: (0, 0, 255) blue = ischemic in 10 files" in out
    assert "TRAINING/KANAMA/MASK: (0, 255, 0) green = hemorrhagic in 10 files" in out
    assert "swap" not in out  # no swap warning for the info note's colours
    assert tree_hashes(fixture.source) == before


def test_png_slices_readable_by_nnunet(nnunet_env, tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    dataset = convert_stroke2021(make(tmp_path, "sdmcseg").source, 22, num_processes=1)
    case = case_ids(dataset / "labelsTr", ".png")[0]
    image, _ = NaturalImage2DIO().read_images([str(dataset / "imagesTr" / f"{case}_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(dataset / "labelsTr" / f"{case}.png"))
    assert image.shape == (1, 1, 48, 48) and seg.shape == (1, 1, 48, 48)


@pytest.mark.parametrize("normalization,i_style", [("NFC", "release"), ("NFD", "release"), ("NFC", "dotless"),
                                                   ("NFD", "upper"), ("NFC", "ascii")])
def test_ministry_layout_matched_in_any_spelling(normalization, i_style, nnunet_env, tmp_path):
    fixture = make(tmp_path, "ministry", normalization=normalization, i_style=i_style)
    on_disk = [p.name for p in fixture.source.rglob("*") if p.is_dir()]
    assert any(fold_name(n) == "egitim veri seti_iskemi" for n in on_disk)
    if normalization == "NFD":  # the names on disk really are decomposed
        assert any(n != unicodedata.normalize("NFC", n) for n in on_disk)
    if i_style == "dotless":
        assert any("ı" in n for n in on_disk) and not any("İ" in n for n in on_disk)
    layout = detect_stroke2021_layout(fixture.source)
    assert layout.kind == "ministry"
    assert sorted(layout.classes) == ["hemorrhagic", "ischemic", "nonstroke"]
    assert layout.classes["ischemic"].mask is None and layout.classes["ischemic"].overlay is not None
    dataset = convert_stroke2021(fixture.source, 23, num_processes=1)
    assert_labels_match_truth(dataset, fixture)  # masks derived from OVERLAY against PNG, outline included


def test_ministry_folders_renamed_or_doubled_by_unzipping(nnunet_env, tmp_path):
    """An unzip tool that makes a folder per archive doubles the non-stroke folder; users rename outer folders
    (e.g. iskemi/iskemi/İskemi Veri Seti); macOS zips add a __MACOSX mirror of the tree."""
    fixture = make(tmp_path, "ministry", normalization="NFD")
    src = fixture.source
    nonstroke = next(p for p in src.iterdir() if fold_name(p.name) == fold_name(MINISTRY_NONSTROKE_PNG))
    wrapper = src / "downloads" / nonstroke.name
    wrapper.mkdir(parents=True)
    nonstroke.rename(wrapper / nonstroke.name)
    kanama_outer = next(p for p in src.iterdir() if "kanama" in fold_name(p.name))
    kanama_outer.rename(src / "hemorrhagic zip")
    iskemi_outer = next(p for p in src.iterdir() if "iskemi" in fold_name(p.name))
    (src / "iskemi").mkdir()
    iskemi_outer.rename(src / "iskemi" / "iskemi")
    shutil.copytree(src / "hemorrhagic zip", src / "__MACOSX" / "hemorrhagic zip")
    layout = detect_stroke2021_layout(src)
    assert layout.kind == "ministry"
    assert layout.classes["nonstroke"].png == wrapper / nonstroke.name
    assert layout.classes["hemorrhagic"].folder.parent == src / "hemorrhagic zip"
    assert layout.classes["ischemic"].folder.parent == src / "iskemi" / "iskemi"
    dataset = convert_stroke2021(src, 24, include_nonstroke=True, num_processes=1)
    assert_labels_match_truth(dataset, fixture, ("ischemic", "hemorrhagic", "nonstroke"))


def test_sdmcseg_layout_with_greyscale_png(nnunet_env, tmp_path):
    fixture = make(tmp_path, "sdmcseg", png_mode="L")
    (fixture.source / "Training" / "Ischemic" / "PNG" / ".DS_Store").write_bytes(b"\0")
    (fixture.source / "Training" / "Ischemic" / "PNG" / "Thumbs.db").write_bytes(b"\0")
    assert detect_stroke2021_layout(fixture.source).kind == "sdmcseg"
    # the Training folder itself is accepted too
    assert detect_stroke2021_layout(fixture.source / "Training").kind == "sdmcseg"
    result = run_cli("-i", fixture.source, "-d", 25, "-np", 1)
    assert result.returncode == 0, result.stderr
    assert "ignored 2 files" in result.stdout
    assert_labels_match_truth(nnunet_env["nnUNet_raw"] / "Dataset025_Stroke2021", fixture)


# ---------------------------------------------------------------------------------------------- DICOM / HU

def test_dicom_mode_writes_hounsfield_units_as_2d_nifti(nnunet_env, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    fixture = make(tmp_path, "competition")
    case = fixture.ids("hemorrhagic")[0]
    item = fixture.slices[case]
    # the fixture stores HU + 1024 with RescaleIntercept -1024: a converter that ignored the rescale would fail below
    stored = np.frombuffer(fixture.files[case]["dicom"].read_bytes()[-item.hu.size * 2:], "<i2").reshape(item.hu.shape)
    np.testing.assert_array_equal(stored, item.hu.astype(np.int32) + 1024)

    dataset = convert_stroke2021(fixture.source, 26, images="dicom", include_nonstroke=True, num_processes=2)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["overwrite_image_reader_writer"] == "SimpleITKIO"
    images = {p.name[: -len("_0000.nii.gz")]: p for part in ("Tr", "Ts") for p in (dataset / f"images{part}").iterdir()}
    labels = all_labels(dataset, ".nii.gz")
    assert sorted(images) == sorted(labels) == sorted(fixture.slices)
    for case_id, path in images.items():
        truth = fixture.slices[case_id]
        image, label = read_nifti(path), read_nifti(labels[case_id])
        assert image.GetDimension() == 2 and label.GetDimension() == 2
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), truth.hu)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), truth.label)
        np.testing.assert_allclose(image.GetSpacing(), truth.spacing, rtol=1e-6)
        np.testing.assert_allclose(label.GetSpacing(), truth.spacing, rtol=1e-6)
    data, properties = SimpleITKIO().read_images([str(images[case])])
    assert data.shape == (1, 1, 48, 48)  # nnU-Net reads a 2D NIfTI as a 2D case
    assert properties["spacing"][1:] == pytest.approx(list(item.spacing)[::-1])


def test_dicom_mode_plans_2d_with_ct_normalisation(nnunet_env, tmp_path):
    convert_stroke2021(make(tmp_path, "ministry").source, 27, images="dicom", num_processes=1)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", 27, "-np", 1, "-npfp", 1, "--no_pp")
    preprocessed = nnunet_env["nnUNet_preprocessed"] / "Dataset027_Stroke2021"
    plans = json.loads((preprocessed / "nnDiffSegPlans.json").read_text())
    assert list(plans["configurations"]) == ["2d"]
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["CTNormalization"]
    # the planner saw Hounsfield units: lesions of the fixture are 18 HU (ischemic) and 62-78 HU (hemorrhagic)
    intensities = plans["foreground_intensity_properties_per_channel"]["0"]
    assert 0 < intensities["percentile_00_5"] < 25 and 55 < intensities["percentile_99_5"] < 95
    raw_splits = json.loads((nnunet_env["nnUNet_raw"] / "Dataset027_Stroke2021" / "splits_final.json").read_text())
    assert json.loads((preprocessed / "splits_final.json").read_text()) == raw_splits


# ---------------------------------------------------------------------------------------------- splits and options

def documented_split(ids: list[str]) -> tuple[list[str], list[str], list[str]]:
    """docs/stroke2021.md's procedure, written out independently."""
    ordered = sorted(ids)
    shuffled = [ordered[i] for i in np.random.default_rng(0).permutation(len(ordered))]
    n_train, n_val = int(np.floor(0.8 * len(ids) + 1e-9)), int(np.floor(0.1 * len(ids) + 1e-9))
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def test_sdmcseg_split_per_class_and_reproducible(nnunet_env, tmp_path):
    fixture = make(tmp_path, "competition", num_ischemic=20, num_hemorrhagic=15, num_nonstroke=10)
    first = convert_stroke2021(fixture.source, 31, include_nonstroke=True, num_processes=2)
    second = convert_stroke2021(fixture.source, 32, include_nonstroke=True, num_processes=1)
    assert tree_hashes(first) == tree_hashes(second)

    splits = json.loads((first / "splits_final.json").read_text())
    assert isinstance(splits, list) and len(splits) == 1 and sorted(splits[0]) == ["train", "val"]
    test_ids = case_ids(first / "labelsTs", ".png")
    expected_sizes = {"ischemic": (16, 2, 2), "hemorrhagic": (12, 1, 2), "nonstroke": (8, 1, 1)}
    for category, sizes in expected_sizes.items():
        train, val, test = documented_split(fixture.ids(category))
        assert (len(train), len(val), len(test)) == sizes
        assert set(train) <= set(splits[0]["train"]) and set(val) <= set(splits[0]["val"])
        assert set(test) <= set(test_ids)
    assert sorted(splits[0]["train"] + splits[0]["val"]) == case_ids(first / "labelsTr", ".png")
    assert len(test_ids) == 5 and not set(test_ids) & set(splits[0]["train"] + splits[0]["val"])
    assert json.loads((first / "dataset.json").read_text())["numTraining"] == 40


def test_nnunet_split_puts_every_slice_into_imagesTr(nnunet_env, tmp_path):
    fixture = make(tmp_path, "ministry")
    dataset = convert_stroke2021(fixture.source, 33, split="nnunet", num_processes=1)
    assert names(dataset) == ["dataset.json", "imagesTr", "labelsTr"]
    assert case_ids(dataset / "labelsTr", ".png") == sorted(fixture.ids("ischemic") + fixture.ids("hemorrhagic"))


def test_include_nonstroke_adds_empty_masks(nnunet_env, tmp_path, capsys):
    fixture = make(tmp_path, "sdmcseg", num_nonstroke=3)
    dataset = convert_stroke2021(fixture.source, 34, include_nonstroke=True, num_processes=1)
    labels = all_labels(dataset)
    for case_id in fixture.ids("nonstroke"):
        assert not read_png(labels[case_id]).any()
    assert_labels_match_truth(dataset, fixture, ("ischemic", "hemorrhagic", "nonstroke"))
    capsys.readouterr()
    default = convert_stroke2021(fixture.source, 35, num_processes=1)
    assert not set(all_labels(default)) & set(fixture.ids("nonstroke"))
    assert "non-stroke slices excluded" in capsys.readouterr().out


def test_swap_mask_colours(nnunet_env, tmp_path, capsys):
    fixture = make(tmp_path, "competition", swap_mask_colours=True)
    as_noted = convert_stroke2021(fixture.source, 36, num_processes=1)
    out = capsys.readouterr().out
    assert "TRAINING/ISKEMI/MASK: (0, 255, 0) green = hemorrhagic in 4 files" in out
    assert "--swap_mask_colours" in out and "WARNING: no MASK in TRAINING/ISKEMI/MASK" in out
    for case_id, path in all_labels(as_noted).items():  # read the info note's way, the classes come out swapped
        truth = fixture.slices[case_id].label
        np.testing.assert_array_equal(read_png(path), (3 - truth) * (truth > 0))

    swapped = convert_stroke2021(fixture.source, 37, swap_mask_colours=True, num_processes=1)
    assert_labels_match_truth(swapped, fixture)
    out = capsys.readouterr().out
    assert "(0, 255, 0) green = ischemic in 4 files" in out and "WARNING: no MASK" not in out


def test_empty_overlay_is_skipped_and_counted(nnunet_env, tmp_path, capsys):
    fixture = make(tmp_path, "sdmcseg")
    case = fixture.ids("ischemic")[1]
    blank = overlay_rgba(fixture.slices[case].png, np.zeros_like(fixture.slices[case].label, bool), ISCHEMIA_COLOUR)
    Image.fromarray(blank).save(fixture.files[case]["overlay"])
    missing = fixture.ids("hemorrhagic")[0]
    fixture.files[missing]["overlay"].unlink()
    dataset = convert_stroke2021(fixture.source, 38, num_processes=2)
    out = capsys.readouterr().out
    assert case not in all_labels(dataset) and missing not in all_labels(dataset)
    assert "skipped ischemic: 1 OVERLAY identical to PNG (no lesion drawn)" in out
    assert "skipped hemorrhagic: 1 no OVERLAY file" in out
    assert len(all_labels(dataset)) == 6
    splits = json.loads((dataset / "splits_final.json").read_text())[0]
    assert case not in splits["train"] + splits["val"]


def test_existing_target_is_refused_then_overwritten(nnunet_env, tmp_path):
    fixture = make(tmp_path, "competition")
    existing = nnunet_env["nnUNet_raw"] / "Dataset039_Stroke2021"
    (existing / "imagesTr").mkdir(parents=True)
    (existing / "imagesTr" / "keep_0000.png").write_bytes(b"precious")
    before = tree_hashes(nnunet_env["nnUNet_raw"])
    assert_refused(run_cli("-i", fixture.source, "-d", 39), [str(existing), "already exists", "--overwrite"])
    assert tree_hashes(nnunet_env["nnUNet_raw"]) == before
    result = run_cli("-i", fixture.source, "-d", 39, "--overwrite", "-np", 1)
    assert result.returncode == 0, result.stderr
    assert not (existing / "imagesTr" / "keep_0000.png").exists()
    assert [p.name for p in nnunet_env["nnUNet_raw"].iterdir()] == ["Dataset039_Stroke2021"]  # no staging leftovers


def test_api_raises_dataset_conversion_error(nnunet_env, tmp_path):
    with pytest.raises(DatasetConversionError, match="does not exist"):
        convert_stroke2021(tmp_path / "nowhere", 1)
    with pytest.raises(DatasetConversionError, match="--images"):
        convert_stroke2021(tmp_path, 1, images="jpeg")


# ---------------------------------------------------------------------------------------------- refused inputs

def _overlay_without_png(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "ministry", src.name, normalization="NFD")
    case = fixture.ids("hemorrhagic")[2]
    fixture.files[case]["png"].unlink()
    return [], ["has no PNG slice", str(fixture.files[case]["overlay"]), str(fixture.files[case]["png"])]


def _mask_without_png(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "competition", src.name)
    case = fixture.ids("ischemic")[0]
    fixture.files[case]["png"].unlink()
    return [], ["MASK", "has no PNG slice", str(fixture.files[case]["mask"])]


def _resize(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        image.resize(size, Image.Resampling.NEAREST).save(path)


def _overlay_size_mismatch(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "sdmcseg", src.name)
    case = fixture.ids("ischemic")[1]
    _resize(fixture.files[case]["overlay"], (49, 48))
    return [], ["size mismatch", str(fixture.files[case]["png"]), str(fixture.files[case]["overlay"]), "48x48",
                "49x48"]


def _mask_size_mismatch(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "competition", src.name)
    case = fixture.ids("hemorrhagic")[1]
    _resize(fixture.files[case]["mask"], (48, 40))
    return [], ["size mismatch", str(fixture.files[case]["mask"]), "48x40"]


def _dicom_size_mismatch(src: Path) -> tuple[list, list[str]]:
    from nndiffseg.dataset_conversion.stroke2021_fixture import write_dicom

    fixture = make(src.parent, "competition", src.name)
    case = fixture.ids("ischemic")[2]
    write_dicom(fixture.files[case]["dicom"], fixture.slices[case].hu[:40], (0.5, 0.5), case)
    return ["--images", "dicom"], ["size mismatch", str(fixture.files[case]["dicom"]), "48x40"]


def _mask_colour_of_neither_class(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "competition", src.name)
    case = fixture.ids("ischemic")[0]
    mask = read_png(fixture.files[case]["mask"]).copy()
    mask[:2, :3] = (255, 0, 0)
    Image.fromarray(mask).save(fixture.files[case]["mask"])
    return [], [str(fixture.files[case]["mask"]), "neither class", "(255, 0, 0) in 6 px"]


def _unreadable_dicom(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "sdmcseg", src.name)
    case = fixture.ids("hemorrhagic")[0]
    fixture.files[case]["dicom"].write_bytes(b"not a DICOM file at all")
    return ["--images", "dicom"], ["cannot read DICOM", str(fixture.files[case]["dicom"])]


def _truncated_png(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "competition", src.name)
    case = fixture.ids("hemorrhagic")[2]
    data = fixture.files[case]["png"].read_bytes()
    fixture.files[case]["png"].write_bytes(data[: len(data) // 2])
    return [], ["cannot read PNG slice", str(fixture.files[case]["png"])]


def _slice_id_in_two_classes(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "sdmcseg", src.name)
    case = fixture.ids("ischemic")[0]
    twin = fixture.files[fixture.ids("hemorrhagic")[0]]
    for kind in ("png", "overlay", "dicom"):
        shutil.copy(fixture.files[case][kind], twin[kind].parent / fixture.files[case][kind].name)
    return [], ["appears in two class folders", str(fixture.files[case]["png"]),
                str(twin["png"].parent / f"{case}.png")]


def _empty_overlay_strict(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "ministry", src.name)
    case = fixture.ids("hemorrhagic")[0]
    Image.fromarray(overlay_rgba(fixture.slices[case].png, np.zeros((48, 48), bool), HEMORRHAGE_COLOUR)).save(
        fixture.files[case]["overlay"])
    return ["--strict"], [str(fixture.files[case]["overlay"]), "identical to its PNG", "--strict"]


def _two_ischemic_folders(src: Path) -> tuple[list, list[str]]:
    fixture = make(src.parent, "ministry", src.name)
    ischemic = fixture.files[fixture.ids("ischemic")[0]]["png"].parent.parent
    shutil.copytree(ischemic, src / "copy" / ischemic.name)
    return [], ["several folders of ischemic slices", str(ischemic), str(src / "copy" / ischemic.name)]


def _unrecognised_layout(src: Path) -> tuple[list, list[str]]:
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    return [], ["unrecognised layout", str(src), "images, masks", "TRAINING/{INMEYOK,ISKEMI,KANAMA}",
                "Kanama Veri Seti", "Training/{Ischemic,Hemorrhagic,Non-Stroke}"]


def _missing_source(src: Path) -> tuple[list, list[str]]:
    return [], [str(src), "does not exist"]


REFUSED = {
    "overlay_without_png": _overlay_without_png,
    "mask_without_png": _mask_without_png,
    "overlay_size_mismatch": _overlay_size_mismatch,
    "mask_size_mismatch": _mask_size_mismatch,
    "dicom_size_mismatch": _dicom_size_mismatch,
    "mask_colour_of_neither_class": _mask_colour_of_neither_class,
    "unreadable_dicom": _unreadable_dicom,
    "truncated_png": _truncated_png,
    "slice_id_in_two_classes": _slice_id_in_two_classes,
    "empty_overlay_strict": _empty_overlay_strict,
    "two_ischemic_folders": _two_ischemic_folders,
    "unrecognised_layout": _unrecognised_layout,
    "missing_source": _missing_source,
}


# errors found while converting pixels also run with -np 2: they must come back from the worker pool intact
@pytest.mark.parametrize("case,num_processes", [(case, 1) for case in sorted(REFUSED)] + [
    ("overlay_size_mismatch", 2), ("unreadable_dicom", 2), ("mask_colour_of_neither_class", 2)])
def test_refused_input_leaves_nothing(case, num_processes, nnunet_env, tmp_path):
    src = tmp_path / "src"
    extra, expected = REFUSED[case](src)
    before = tree_hashes(src) if src.exists() else {}
    result = run_cli("-i", src, "-d", 40, "-np", num_processes, *extra)
    assert_refused(result, expected)
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []  # no dataset, no .partial staging folder
    if src.exists():
        assert tree_hashes(src) == before


# ---------------------------------------------------------------------------------------------- end to end

def test_plan_train_predict_evaluate(tmp_path):
    """The 3-class dataset through the nnDiffSeg_ tools: fold 0 is SDMC-Seg's train/val from splits_final.json."""
    # one export worker for nnU-Net's final validation: each is a spawned process importing torch
    env = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        env[name] = str(tmp_path / name)
    fixture = write_stroke2021_fixture(tmp_path / "src", "competition", num_ischemic=15, num_hemorrhagic=15,
                                       num_nonstroke=0, size=64, seed=3)
    result = subprocess.run([sys.executable, "-m", MODULE, "-i", str(fixture.source), "-d", "41", "-np", "2"],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    raw = tmp_path / "nnUNet_raw" / "Dataset041_Stroke2021"
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", 41, "-np", 1, "-npfp", 1, env=env)
    run_tool("nnDiffSeg_train", 41, "2d", 0, "-tr", "nnUNetTrainer", "-device", "cpu", "--num_epochs", 2,
             "--iters_per_epoch", 5, env=env)
    log = next((tmp_path / "nnUNet_results").rglob("training_log_*.txt")).read_text()
    assert "This split has 24 training and 2 validation cases" in log

    predictions = tmp_path / "predictions"
    run_tool("nnDiffSeg_predict", "-i", raw / "imagesTs", "-o", predictions, "-d", 41, "-c", "2d",
             "-tr", "nnUNetTrainer", "-f", 0, "-device", "cpu", "-nps", 0, "--disable_tta", env=env)
    assert sorted(p.name[:-4] for p in predictions.glob("*.png")) == case_ids(raw / "labelsTs", ".png")
    assert (predictions / "dataset.json").is_file() and (predictions / "plans.json").is_file()
    run_tool("nnDiffSeg_evaluate", "-ref", raw / "labelsTs", "-pred", predictions, "-np", 1, env=env)
    summary = json.loads((predictions / "summary.json").read_text())
    assert sorted(summary["per_class"]) == ["1", "2"]
    assert len(summary["cases"]) == 4
