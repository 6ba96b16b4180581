"""nnDiffSeg_convert_multirater: the real LIDC sample (rater files and majority labels against a threshold and vote
computed here from the JPEGs), the synthetic release of nndiffseg.demo.synthetic_multirater in QUBIQ's layout
(depth-1 storage, channels, --task 2) and the LIDC one, the strict majority's tie rule with 2, 3 and 4 raters, and
every refused input through the command line: exit 1, one ERROR: line naming the file, no traceback, nothing under
nnUNet_raw, the source unchanged."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli import assert_refused
from PIL import Image
from scipy import ndimage
from test_convert_isic import read_png, tree_hashes

from nndiffseg.dataset_conversion.common import DatasetConversionError
from nndiffseg.dataset_conversion.multirater import convert_multirater
from nndiffseg.demo.synthetic_multirater import ORIGIN, SPACING, jitter, main, write_multirater_fixture

MODULE = "nndiffseg.dataset_conversion.multirater"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def read_nifti(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def write_nifti(values: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path), useCompression=True)


def meta(dataset: Path) -> dict:
    return json.loads((dataset / "dataset.json").read_text())


# ---------------------------------------------------------------------------------------------- real LIDC sample

def test_real_lidc_sample(lidc_multirater_sample, nnunet_env, capsys):
    before = tree_hashes(lidc_multirater_sample)
    dataset = convert_multirater(lidc_multirater_sample, 5, num_processes=2)
    summary = capsys.readouterr().out
    assert dataset == nnunet_env["nnUNet_raw"] / "Dataset005_LIDC"
    info = meta(dataset)
    assert (info["numTraining"], info["num_raters"], info["file_ending"]) == (19, 4, ".png")
    assert info["labels"] == {"background": 0, "foreground": 1}
    assert info["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    assert "strictly more than half" in info["description"] and "2 of 4 raters, is background" in info["description"]
    ties = 0
    for split, part, count in (("training", "Tr", 19), ("testing", "Ts", 9)):
        folders = sorted((lidc_multirater_sample / split).iterdir())
        assert len(folders) == count
        assert sorted(p.name for p in (dataset / f"labels{part}").iterdir()) == sorted(
            f"lidc{f.name}.png" for f in folders)
        assert len(list((dataset / f"raters{part}").iterdir())) == 4 * count
        for folder in folders:
            case = f"lidc{folder.name}"
            (image,) = folder.glob("image_*.jpg")
            np.testing.assert_array_equal(read_png(dataset / f"images{part}" / f"{case}_0000.png"),
                                          np.asarray(Image.open(image)))
            raters = [np.asarray(Image.open(folder / f"label{r}_.jpg")) > 127 for r in range(4)]
            for r, expected in enumerate(raters, 1):
                np.testing.assert_array_equal(read_png(dataset / f"raters{part}" / f"{case}_rater{r:02d}.png"),
                                              expected.astype(np.uint8))
            votes = np.sum(raters, axis=0)
            np.testing.assert_array_equal(read_png(dataset / f"labels{part}" / f"{case}.png"),
                                          (votes >= 3).astype(np.uint8))
            ties += int((votes == 2).sum())
    assert ties > 0  # the sample holds 2-of-4 pixels, written as background above
    assert "training: 19 cases -> imagesTr, labelsTr, ratersTr" in summary
    assert "testing: 9 cases -> imagesTs, labelsTs, ratersTs" in summary
    assert "empty masks per rater: rater01 5, rater02 7, rater03 6, rater04 1 (of 28 cases)" in summary  # 19 of 112
    assert "mean pairwise rater Dice: 0.755" in summary
    assert tree_hashes(lidc_multirater_sample) == before


# ---------------------------------------------------------------------------------------------- synthetic releases

def test_synthetic_qubiq_depth_one_channels_and_task_2(nnunet_env, tmp_path, capsys):
    fixture = write_multirater_fixture(tmp_path / "brain-growth", 5, 3, size=48, seed=1, num_tasks=2, depth_one=True,
                                       channels=2)
    before = tree_hashes(fixture.source)
    first = read_nifti(fixture.source / "Training" / "case01" / "image.nii.gz")[1]
    assert first.GetSize() == (48, 48, 2)  # channels on the third axis, as QUBIQ's brain tumour stores them
    assert read_nifti(fixture.source / "Training" / "case01" / "task01_seg01.nii.gz")[1].GetSize() == (48, 48, 1)

    dataset = convert_multirater(fixture.source, 11, num_processes=2)
    assert dataset.name == "Dataset011_QUBIQbraingrowth"
    info = meta(dataset)
    assert (info["numTraining"], info["num_raters"], info["file_ending"]) == (5, 4, ".nii.gz")
    assert info["channel_names"] == {"0": "image 0", "1": "image 1"}
    assert info["overwrite_image_reader_writer"] == "SimpleITKIO"
    task2 = convert_multirater(fixture.source, 12, task=2, num_processes=1)
    assert task2.name == "Dataset012_QUBIQbraingrowthTask2"
    assert "validation_case01, validation_case02, validation_case03" in capsys.readouterr().out
    for case in fixture.cases:
        part = "Tr" if case.split == "Training" else "Ts"
        name = case.name if part == "Tr" else f"validation_{case.name}"  # QUBIQ numbers validation cases anew
        for c in range(2):
            values, image = read_nifti(dataset / f"images{part}" / f"{name}_{c:04d}.nii.gz")
            np.testing.assert_array_equal(values, case.image[c])
            assert image.GetSpacing() == pytest.approx(SPACING[:2]) and image.GetOrigin() == pytest.approx(ORIGIN[:2])
        for folder, raters in ((dataset, case.raters), (task2, case.task2_raters)):
            for r, expected in enumerate(raters, 1):
                values, image = read_nifti(folder / f"raters{part}" / f"{name}_rater{r:02d}.nii.gz")
                np.testing.assert_array_equal(values, expected.astype(np.uint8))
                assert image.GetSpacing() == pytest.approx(SPACING[:2])
            label = read_nifti(folder / f"labels{part}" / f"{name}.nii.gz")[0]
            np.testing.assert_array_equal(label, 2 * np.sum(raters, axis=0) > 4)
        # the jittered clear blob's majority is the blob; a faint blob marked by 2 of the 4 raters is a tie
        np.testing.assert_array_equal(read_nifti(dataset / f"labels{part}" / f"{name}.nii.gz")[0], case.clear)
    assert any(c.faint is not None for c in fixture.cases)
    assert tree_hashes(fixture.source) == before


def test_nnunet_accepts_the_datasets(nnunet_env, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    qubiq = write_multirater_fixture(tmp_path / "tumour", 3, 1, size=32, depth_one=True, channels=3)
    lidc = write_multirater_fixture(tmp_path / "lidc", 3, 1, size=32, layout="lidc")
    for dataset_id, fixture in enumerate((qubiq, lidc), 21):
        verify_dataset_integrity(str(convert_multirater(fixture.source, dataset_id, num_processes=1)), 1)


@pytest.mark.parametrize("num_raters,faint_raters,faint_in_label", [(2, 1, False), (4, 2, False), (3, 2, True),
                                                                    (4, 3, True)])
def test_strict_majority_tie_is_background(num_raters, faint_raters, faint_in_label, nnunet_env, tmp_path):
    fixture = write_multirater_fixture(tmp_path / "tie", 3, 0, size=48, num_raters=num_raters,
                                       faint_raters=faint_raters, faint_fraction=1.0)
    dataset = convert_multirater(fixture.source, 13, num_processes=1)
    assert meta(dataset)["num_raters"] == num_raters
    for case in fixture.cases:
        label = read_nifti(dataset / "labelsTr" / f"{case.name}.nii.gz")[0].astype(bool)
        np.testing.assert_array_equal(label, 2 * np.sum(case.raters, axis=0) > num_raters)
        if faint_in_label:
            assert label[ndimage.binary_erosion(case.faint)].all()
        else:
            assert not label[case.faint].any()


def test_nifti_masks_as_float_and_0_255(nnunet_env, tmp_path):
    fixture = write_multirater_fixture(tmp_path / "coded", 2, 0, size=32)
    folder, case = fixture.source / "Training" / "case01", fixture.cases[0]
    write_nifti(case.raters[0].astype(np.float32), folder / "task01_seg01.nii.gz")
    write_nifti(case.raters[1].astype(np.uint8) * 255, folder / "task01_seg02.nii.gz")
    write_nifti(case.raters[2].astype(np.float64) * 255, folder / "task01_seg03.nii.gz")
    dataset = convert_multirater(fixture.source, 14, num_processes=1)
    for r, expected in enumerate(case.raters, 1):
        values = read_nifti(dataset / "ratersTr" / f"case01_rater{r:02d}.nii.gz")[0]
        assert values.dtype == np.uint8
        np.testing.assert_array_equal(values, expected)


def test_synthetic_lidc_through_the_cli(nnunet_env, tmp_path):
    assert main([str(tmp_path / "lidc"), "--layout", "lidc", "--num_train", "3", "--num_test", "2", "--size",
                 "32"]) == 0
    fixture = write_multirater_fixture(tmp_path / "again", 3, 2, size=32, layout="lidc")  # the same, seed 0
    result = run_cli("-i", tmp_path / "lidc", "-d", 15, "--name", "LIDCtoy", "--label_name", "nodule", "-np", 1)
    assert result.returncode == 0, result.stderr
    dataset = nnunet_env["nnUNet_raw"] / "Dataset015_LIDCtoy"
    assert meta(dataset)["labels"] == {"background": 0, "nodule": 1}
    assert "LIDC layout" in result.stdout and "mean pairwise rater Dice" in result.stdout
    for case in fixture.cases:
        part = "Tr" if case.split == "training" else "Ts"
        for r, expected in enumerate(case.raters, 1):  # JPEG noise stays on its side of 127
            np.testing.assert_array_equal(read_png(dataset / f"raters{part}" / f"lidc{case.name}_rater{r:02d}.png"),
                                          expected)


def test_fixture_ground_truth(tmp_path):
    fixture = write_multirater_fixture(tmp_path / "truth", 8, 4, size=48, seed=3)
    assert fixture.rater_fraction == 0.5
    faint = fixture.faint_cases()
    assert len(faint) == 6
    assert len({c.faint_raters for c in faint}) > 1  # which raters mark the faint blob varies
    for case in fixture.cases:
        near_clear = ndimage.binary_dilation(case.clear, iterations=3)
        for r, mask in enumerate(case.raters):
            np.testing.assert_array_equal(mask & near_clear, jitter(case.clear, r))
            if case.faint is not None:
                assert mask[case.faint].any() == (r in case.faint_raters)
        drawn = [(m & near_clear).sum() for m in case.raters[:3]]
        assert drawn[0] == case.clear.sum() and drawn[1] > drawn[0] > drawn[2]  # exact, dilated, eroded
        on_disk = read_nifti(tmp_path / "truth" / case.split / case.name / "task01_seg02.nii.gz")[0]
        np.testing.assert_array_equal(on_disk, case.raters[1])
    for case in faint:  # the faint blob has under half the clear one's contrast
        image, background = case.image[0], ~ndimage.binary_dilation(case.clear | case.faint, iterations=2)
        assert image[case.faint].mean() - image[background].mean() < (
            image[case.clear].mean() - image[background].mean()) / 2
    assert all(len(c.faint_raters) == 2 for c in faint)


def test_api_raises_dataset_conversion_error(nnunet_env, tmp_path):
    with pytest.raises(DatasetConversionError, match="does not exist"):
        convert_multirater(tmp_path / "nowhere", 1)
    fixture = write_multirater_fixture(tmp_path / "lidc", 1, 0, size=32, layout="lidc")
    with pytest.raises(DatasetConversionError, match="no tasks"):
        convert_multirater(fixture.source, 1, task=2)
    with pytest.raises(DatasetConversionError, match="--channel_names gives 2 names"):
        convert_multirater(fixture.source, 1, channel_names=["a", "b"])
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []


# ---------------------------------------------------------------------------------------------- refused inputs

def qubiq(root: Path, **options):
    return write_multirater_fixture(root / "task", 3, 2, size=32, **options)


def lidc(root: Path):
    return write_multirater_fixture(root / "lidc", 3, 2, size=32, layout="lidc")


def _missing_rater(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Training" / "case02" / "task01_seg03.nii.gz"
    path.unlink()
    return fixture.source, [], ["missing rater", str(path)]


def _missing_rater_lidc(root: Path):
    fixture = lidc(root)
    path = fixture.source / "testing" / "4" / "label3_.jpg"
    path.unlink()
    return fixture.source, [], ["missing rater", str(path)]


def _size_mismatch(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Training" / "case03" / "task01_seg02.nii.gz"
    write_nifti(np.zeros((33, 32), np.uint8), path)
    return fixture.source, [], ["size mismatch", str(path.parent / "image.nii.gz"), str(path), "32x32", "32x33"]


def _non_binary_mask(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Validation" / "case01" / "task01_seg04.nii.gz"
    write_nifti(np.arange(32 * 32).reshape(32, 32) % 3, path)
    return fixture.source, [], ["non-binary mask", str(path), "values 0, 1, 2"]


def _mask_0_1_255(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Training" / "case01" / "task01_seg01.nii.gz"
    values = fixture.cases[0].raters[0].astype(np.uint8)
    values[0, :2] = 255
    write_nifti(values, path)
    return fixture.source, [], ["non-binary mask", str(path), "values 0, 1, 255"]


def _truncated_image(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Training" / "case02" / "image.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # SimpleITK alone reads it, the missing half as zeros
    return fixture.source, [], ["cannot read image", str(path), "EOFError"]


def _corrupt_jpeg_mask(root: Path):
    fixture = lidc(root)
    path = fixture.source / "training" / "1" / "label1_.jpg"
    path.write_bytes(b"not a jpeg")
    return fixture.source, [], ["cannot read mask", str(path)]


def _nan_image(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Validation" / "case02" / "image.nii.gz"
    values = fixture.cases[4].image[0].copy()
    values[3:5, 3:6] = np.nan
    write_nifti(values, path)
    return fixture.source, [], [f"image {path} has non-finite values (NaN or Inf) in 6 of 1024 pixels"]


def _image_without_masks(root: Path):
    fixture = qubiq(root)
    folder = fixture.source / "Training" / "case01"
    for mask in folder.glob("task01_*"):
        mask.unlink()
    return fixture.source, [], ["image without masks", str(folder / "image.nii.gz"), "task01_seg01.nii.gz"]


def _mask_without_image(root: Path):
    fixture = qubiq(root)
    folder = fixture.source / "Validation" / "case02"
    (folder / "image.nii.gz").unlink()
    return fixture.source, [], ["mask without image", str(folder / "task01_seg01.nii.gz"), str(folder / "image.nii.gz")]


def _colour_jpeg_image(root: Path):
    fixture = lidc(root)
    (path,) = (fixture.source / "training" / "0").glob("image_*.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return fixture.source, [], [f"image {path} is a colour image (its channels differ)"]


def _channels_differ(root: Path):
    fixture = qubiq(root)
    path = fixture.source / "Validation" / "case01" / "image.nii.gz"
    write_nifti(np.zeros((2, 32, 32), np.float32), path)
    return fixture.source, [], [f"image {path} has 2 channels but", "every case needs the same channels"]


def _two_layouts(root: Path):
    source = qubiq(root).source
    shutil.move(str(lidc(root).source / "testing"), source)
    return source, [], ["several multi-rater layouts", f"QUBIQ ({source / 'Training'}, {source / 'Validation'})",
                        f"LIDC ({source / 'testing'})"]


def _absent_task(root: Path):
    return qubiq(root, num_tasks=2).source, ["--task", 3], ["--task 3", "tasks present: 1, 2"]


def _release_root_given(root: Path):
    write_multirater_fixture(root / "qubiq" / "brain-growth", 1, 0, size=32)
    return root / "qubiq", [], ["unrecognised layout", str(root / "qubiq"),
                                f"{root / 'qubiq' / 'brain-growth'} looks like one: pass that folder as -i"]


REFUSED = {
    "missing_rater": _missing_rater, "missing_rater_lidc": _missing_rater_lidc, "size_mismatch": _size_mismatch,
    "non_binary_mask": _non_binary_mask, "mask_0_1_255": _mask_0_1_255, "truncated_image": _truncated_image,
    "corrupt_jpeg_mask": _corrupt_jpeg_mask, "nan_image": _nan_image, "image_without_masks": _image_without_masks,
    "mask_without_image": _mask_without_image, "colour_jpeg_image": _colour_jpeg_image,
    "channels_differ": _channels_differ, "two_layouts": _two_layouts, "absent_task": _absent_task,
    "release_root_given": _release_root_given,
}


# errors found while reading pixels also run with -np 2: they must come back from the worker pool intact
@pytest.mark.parametrize("case,num_processes", [(case, 1) for case in REFUSED] + [
    ("size_mismatch", 2), ("nan_image", 2), ("corrupt_jpeg_mask", 2)])
def test_refused_input_leaves_nothing(case, num_processes, nnunet_env, tmp_path):
    source, options, expected = REFUSED[case](tmp_path)
    before = tree_hashes(source)
    result = run_cli("-i", source, "-d", 9, "-np", num_processes, *options)
    assert_refused(result, expected)
    assert sum(line.startswith("ERROR:") for line in result.stderr.splitlines()) == 1, result.stderr
    assert list(nnunet_env["nnUNet_raw"].iterdir()) == []  # no dataset, no staging folder
    assert tree_hashes(source) == before
