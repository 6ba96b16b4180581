"""Garbage in at conversion (issue 28): high-bit-depth ISIC images rescaled by their type's range, non-finite
images and DICOM slices refused by name, per-slice DICOM anomalies warned by file, and a folder holding two
Stroke2021 layouts refused."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli import assert_refused, run_batch
from PIL import Image
from test_convert_isic import TRAIN_2017, make_2017, read_png, tree_hashes

from nndiffseg.dataset_conversion.common import DatasetConversionError
from nndiffseg.dataset_conversion.isic import convert_isic
from nndiffseg.dataset_conversion.stroke2021 import convert_stroke2021
from nndiffseg.dataset_conversion.stroke2021_fixture import (
    edit_dicom_element,
    write_dicom,
    write_stroke2021_fixture,
)

RESCALE_SLOPE, RESCALE_INTERCEPT = (0x0028, 0x1053), (0x0028, 0x1052)


def replace_image(src: Path, number: int, write) -> Path:
    """Case ``number``'s JPEG (from make_2017) replaced by ``write(path)`` at ISIC_<number>.png."""
    folder = src / TRAIN_2017[0]
    (folder / f"ISIC_{number:07d}.jpg").unlink()
    path = folder / f"ISIC_{number:07d}.png"
    write(path)
    return path


def uint16_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    values.flat[:2] = 0, 65535  # the type's full range
    return values


def write_rgb48(path: Path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG: Pillow cannot write one, ITK's PNG writer can."""
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=True), str(path))


def small_stroke_release(root: Path, layout: str = "sdmcseg", name: str = "src"):
    return write_stroke2021_fixture(root / name, layout, num_ischemic=3, num_hemorrhagic=3, num_nonstroke=0, size=32)


# ---------------------------------------------------------------------------------------------- ISIC bit depth

def test_isic_16_bit_images_are_rescaled_by_their_type_range(nnunet_env, tmp_path):
    """Pillow reduces a 16-bit-per-channel RGB PNG to each value's high byte but clipped 16-bit grey to 255 (a
    white image); grey now gets the high byte too, so the same grey converts alike in either storage."""
    src = make_2017(tmp_path / "isic", numbers=(1, 2, 3, 4))
    grey = uint16_values((30, 40), seed=2)
    rgb = uint16_values((30, 40, 3), seed=3)
    replace_image(src, 2, lambda path: Image.fromarray(grey).save(path))
    replace_image(src, 3, lambda path: write_rgb48(path, rgb))
    replace_image(src, 4, lambda path: write_rgb48(path, np.repeat(grey[..., None], 3, axis=-1)))
    with Image.open(src / TRAIN_2017[0] / "ISIC_0000002.png") as image:
        assert image.mode == "I;16"

    dataset = convert_isic(src, 17, num_processes=1)
    converted = {n: read_png(dataset / "imagesTr" / f"ISIC_{n:07d}_0000.png") for n in (2, 3, 4)}
    np.testing.assert_array_equal(converted[2], np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    np.testing.assert_array_equal(converted[3], (rgb >> 8).astype(np.uint8))
    np.testing.assert_array_equal(converted[4], converted[2])
    assert converted[2].min() == 0 and converted[2].max() == 255


def test_isic_other_high_bit_depth_modes():
    from nndiffseg.dataset_conversion.isic import rgb8

    path = Path("ISIC_0000009.png")
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(rgb8(Image.fromarray(floats), path))[..., 1],
                                  np.round(floats * 255).astype(np.uint8))
    wide = uint16_values((3, 4), seed=4).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(rgb8(Image.fromarray(wide), path))[..., 2], wide >> 8)
    refused = {"F": (floats * 2, "outside 0..1"), "I": (wide * 2, "outside 0..65535"),
               "F nan": (np.where(floats > 0.5, np.nan, floats), "non-finite values")}
    for values, expected in refused.values():
        with pytest.raises(DatasetConversionError, match=expected) as error:
            rgb8(Image.fromarray(values), path)
        assert str(path) in str(error.value)
    with pytest.raises(DatasetConversionError, match="mode LAB"):
        rgb8(Image.new("LAB", (4, 3)), path)


# ---------------------------------------------------------------------------------------------- Stroke2021 DICOM

def test_stroke2021_dicom_anomalies_are_warned_per_file(nnunet_env, tmp_path, capsys):
    fixture = small_stroke_release(tmp_path)
    ids = sorted(fixture.ids("ischemic") + fixture.ids("hemorrhagic"))
    odd, untagged, corrupt = ids[2], ids[4], ids[0]
    for case in ids:  # one scanner's spacing for every slice but one
        write_dicom(fixture.files[case]["dicom"], fixture.slices[case].hu, (0.9 if case == odd else 0.5,) * 2, case)
    for tag in (RESCALE_SLOPE, RESCALE_INTERCEPT):
        edit_dicom_element(fixture.files[untagged]["dicom"], *tag, None)
    edit_dicom_element(fixture.files[corrupt]["dicom"], *RESCALE_INTERCEPT, b"nan")

    dataset = convert_stroke2021(fixture.source, 23, images="dicom", split="nnunet", num_processes=1)
    warnings = [line.strip() for line in capsys.readouterr().out.splitlines() if "WARNING: DICOM" in line]
    assert len(warnings) == 3, warnings
    assert warnings[0] == (f"WARNING: DICOM {fixture.files[corrupt]['dicom']}: RescaleIntercept 'nan' is not a "
                           f"number: intercept 0 assumed, so its values may not be HU")
    assert warnings[1].startswith(f"WARNING: DICOM {fixture.files[odd]['dicom']}: pixel spacing 0.9 x 0.9 mm "
                                  f"unlike its neighbours' 0.5 x 0.5 mm ({ids[1]}.dcm, {ids[3]}.dcm)")
    assert warnings[2] == (f"WARNING: DICOM {fixture.files[untagged]['dicom']}: no RescaleSlope/RescaleIntercept: "
                           f"slope 1 and intercept 0 assumed, so its values may not be HU")
    for case in ids:  # what the warnings say was done: HU + 1024 are the values the fixture stores
        image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        expected = fixture.slices[case].hu + (1024 if case in (untagged, corrupt) else 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected, err_msg=case)
        assert image.GetSpacing() == pytest.approx((0.9 if case == odd else 0.5,) * 2)


def test_dicom_warnings_name_each_file_up_to_a_cap(tmp_path):
    from nndiffseg.dataset_conversion.dicom_checks import MAX_WARNINGS_SHOWN, DicomSliceInfo, anomaly_warnings

    untagged = ("no RescaleSlope: slope 1 assumed, so its values may not be HU",)
    slices = [DicomSliceInfo(tmp_path / f"{i}.dcm", (0.5, 0.5), untagged) for i in range(MAX_WARNINGS_SHOWN + 5)]
    lines = anomaly_warnings(slices)
    assert lines[:-1] == [f"WARNING: DICOM {tmp_path / f'{i}.dcm'}: {untagged[0]}" for i in range(MAX_WARNINGS_SHOWN)]
    assert lines[-1] == "... and 5 more DICOM files with such anomalies"
    # spacing: each patient's own is no anomaly; one slice off its neighbours' is, at either end too
    varied = [DicomSliceInfo(tmp_path / f"{i}.dcm", (0.4 + i / 100,) * 2) for i in range(5)]
    assert anomaly_warnings(varied) == []
    for odd in (0, 2, 4):
        flagged = [DicomSliceInfo(s.path, (0.8,) * 2 if i == odd else (0.5,) * 2) for i, s in enumerate(varied)]
        assert [line.split(":")[1].split()[-1] for line in anomaly_warnings(flagged)] == [str(tmp_path / f"{odd}.dcm")]
    assert anomaly_warnings(flagged[:2]) == []


# ---------------------------------------------------------------------------------------------- refusals

def _isic_nan_image(root: Path) -> tuple[str, Path, list, list[str]]:
    src = make_2017(root / "isic_nan")
    floats = np.random.default_rng(0).uniform(0, 1, (30, 40)).astype(np.float32)
    floats[5:9, 5:9] = np.nan
    path = replace_image(src, 2, lambda p: Image.fromarray(floats).save(p, format="TIFF"))  # a float image
    return "nnDiffSeg_convert_isic", src, [], [str(path), "non-finite values (NaN or Inf) in 16 of 1200 pixels"]


def _isic_32_bit_integers(root: Path) -> tuple[str, Path, list, list[str]]:
    src = make_2017(root / "isic_int32")
    values = np.arange(1200, dtype=np.int32).reshape(30, 40) * 1000
    path = replace_image(src, 3, lambda p: Image.fromarray(values).save(p, format="TIFF"))
    return "nnDiffSeg_convert_isic", src, [], [str(path), "32-bit integer", "0..1199000", "outside 0..65535"]


def _dicom_infinite(root: Path) -> tuple[str, Path, list, list[str]]:
    fixture = small_stroke_release(root, name="stroke_inf")
    dicom = fixture.files[fixture.ids("hemorrhagic")[1]]["dicom"]
    edit_dicom_element(dicom, *RESCALE_SLOPE, b"1e308")  # GDCM multiplies by it: Inf
    return ("nnDiffSeg_convert_stroke2021", fixture.source, ["--images", "dicom"],
            [f"DICOM {dicom} has non-finite values (NaN or Inf) in", "RescaleSlope 1e308"])


def _two_layouts(root: Path) -> tuple[str, Path, list, list[str]]:
    src = small_stroke_release(root, "competition", "stroke_two").source
    ministry = small_stroke_release(root, "ministry", "ministry").source
    for folder in sorted(ministry.iterdir()):
        shutil.move(str(folder), src)
    ministry.rmdir()
    return ("nnDiffSeg_convert_stroke2021", src, [],
            [f"{src} holds several Stroke2021 layouts", f"competition ({src / 'TRAINING'})",
             f"ministry ({src / 'Eğitim Veri Seti_Kanama'}, {src / 'Eğitim Veri Seti_İskemi'})"])


def _isic_nan_mask(root: Path) -> tuple[str, Path, list, list[str]]:
    src = make_2017(root / "isic_nan_mask")
    mask = src / TRAIN_2017[1] / "ISIC_0000003_segmentation.png"
    values = read_png(mask).astype(np.float32)
    values[:2, :3] = np.nan  # Pillow's RGB(A) conversion turns NaN into 0: background
    Image.fromarray(values).save(mask, format="TIFF")
    return "nnDiffSeg_convert_isic", src, [], [f"mask {mask} has non-finite values (NaN or Inf) in 6 of 1200 pixels"]


REFUSED = {"isic_nan_image": _isic_nan_image, "isic_nan_mask": _isic_nan_mask,
           "isic_32_bit_integers": _isic_32_bit_integers, "dicom_infinite": _dicom_infinite,
           "two_layouts": _two_layouts}


def test_garbage_is_refused_by_name_and_nothing_is_written(nnunet_env, tmp_path):
    cases = {name: make(tmp_path) for name, make in REFUSED.items()}
    before = {name: tree_hashes(src) for name, (_, src, _, _) in cases.items()}
    commands = [(tool, ["-i", src, "-d", 60 + i, "-np", 1, *extra])
                for i, (tool, src, extra, _) in enumerate(cases.values())]
    results = run_batch(tmp_path, "refusals", commands, {})
    for (name, (_, src, _, expected)), result in zip(cases.items(), results):
        assert_refused(result, expected)
        assert tree_hashes(src) == before[name], name
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []  # no dataset, no staging folder
