"""Convert a multi-rater 2D segmentation release (several readers' masks per image) into an nnU-Net v2 raw dataset
that keeps every rater's mask beside a majority-vote label.

    nnDiffSeg_convert_multirater -i /data/qubiq/brain-growth -d 42    # -> $nnUNet_raw/Dataset042_QUBIQbraingrowth
    nnDiffSeg_convert_multirater -i /data/lidc_multirater -d 43       # -> $nnUNet_raw/Dataset043_LIDC

Two layouts are recognised from the folder (see docs/multirater.md):

- QUBIQ: ``<task>/{Training,Validation}/caseNN/image.nii.gz`` with ``task01_seg01.nii.gz ... task01_segRR.nii.gz``
  (``--task N`` picks ``taskNN_``). One 2D slice per case, also when stored with a depth of 1; a 2D image with a
  further axis of several values (brain tumour's MR sequences) is written channel by channel. Masks must hold
  exactly {0, 1} or {0, 255}. Output NIfTI (SimpleITKIO), spacing and origin of the first two axes kept.
- LIDC (as the multi-rater LIDC crops are shared): ``<split>/<n>/image_*.jpg`` with ``label0_.jpg ...
  labelR_.jpg``: 8-bit grey JPEGs; a mask pixel is foreground where its value is above 127 (JPEG noise). Output
  PNG (NaturalImage2DIO); case ``<n>`` becomes ``lidc<n>``.

Split folders (any case): training/train -> imagesTr, labelsTr, ratersTr; validation/val/testing/test -> ...Ts.
``labels*/<case>`` is the majority vote: foreground where STRICTLY more than half of the raters mark it, so a tie
(2 of 4 raters) is background. ``raters*/<case>_rater01`` ... hold every rater's {0, 1} mask, numbered from 01 in
the release's order; dataset.json gets ``num_raters``. A non-training case named as a training case is prefixed
with its split folder's name (``validation_case01``). The source is only read; a failure leaves nothing behind.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from nndiffseg.dataset_conversion.common import (
    DEFAULT_NUM_PROCESSES,
    DatasetConversionError,
    check_num_processes,
    check_same_size,
    check_target_free,
    converter_parser,
    dataset_folder_name,
    load_image,
    nnunet_raw_folder,
    refuse_non_finite,
    run_converter,
    run_jobs,
    save_png,
    source_folder,
    staged_folder,
)
from nndiffseg.dataset_conversion.multirater_layouts import (
    JPEG_THRESHOLD,
    LAYOUTS,
    Case,
    LayoutSpec,
    collect_cases,
    detect_layout,
)
from nndiffseg.evaluation.multirater_metrics import majority_vote
from nndiffseg.planning.raters import RATERS_FOLDER, rater_file_name

BINARY_VALUES = ({0, 1}, {0, 255})  # what a NIfTI mask may hold (any numeric type)
DEFAULT_LABEL_NAME = "foreground"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
TIE_RULE = ("the raters' majority vote: foreground where strictly more than half of the raters mark it (a tie, "
            "e.g. 2 of 4 raters, is background)")


# ---------------------------------------------------------------------------------------------- pixels

def _read_nifti(path: Path, what: str) -> tuple[np.ndarray, sitk.Image]:
    """The file as (channels, y, x) and an empty 2D image with the spacing, origin and direction of its first two
    axes (for CopyInformation); any axis beyond them (a depth of 1,
    a channel axis, vector components) becomes channels, but at most one of them may hold several values. Read
    by nibabel too: SimpleITK (ITK 5.4) reads a truncated .nii.gz and NaN or Inf values as zeros, silently."""
    try:
        refuse_non_finite(np.asanyarray(nibabel.load(path).dataobj), f"{what} {path}")
        image = sitk.ReadImage(str(path))
    except DatasetConversionError:
        raise
    except Exception as e:  # nibabel's errors have no common base: EOFError, ImageFileError, zlib.error, ...
        text = " ".join(str(e).split("ITK ERROR:")[-1].split())
        raise DatasetConversionError(f"cannot read {what} {path}: {type(e).__name__}: {text} (corrupt or "
                                     f"truncated file?)") from None
    values = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        values = np.moveaxis(values, -1, 0)
    if values.ndim < 2 or sum(n > 1 for n in values.shape[:-2]) > 1:
        raise DatasetConversionError(
            f"{what} {path} is not a 2D slice (size {'x'.join(map(str, image.GetSize()))}, "
            f"{image.GetNumberOfComponentsPerPixel()} components per pixel); expected one 2D slice, optionally "
            f"stored with a depth of 1 or with one axis of channels")
    dim = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(dim, dim)[:2, :2]
    if not np.allclose(direction @ direction.T, np.eye(2)):  # an oblique slice: its 2D part is no rotation
        direction = np.eye(2)
    geometry = sitk.Image(values.shape[-1], values.shape[-2], sitk.sitkUInt8)
    geometry.SetSpacing(image.GetSpacing()[:2])
    geometry.SetOrigin(image.GetOrigin()[:2])
    geometry.SetDirection(tuple(direction.ravel()))
    return values.reshape(-1, *values.shape[-2:]), geometry


def _grey_jpeg(path: Path, what: str) -> np.ndarray:
    image = load_image(path, what)
    if image.mode == "L":
        return np.asarray(image)
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise DatasetConversionError(f"{what} {path} is a colour image (its channels differ); expected 8-bit grey")
    return rgb[..., 0]


def _binary_nifti(values: np.ndarray, path: Path) -> np.ndarray:
    found = np.unique(values)
    for allowed in BINARY_VALUES:
        if set(found.tolist()) <= allowed:
            return (values == max(allowed)).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in found[:10]) + (f", ... ({len(found)} distinct)" if len(found) > 10 else "")
    raise DatasetConversionError(f"non-binary mask {path}: values {shown}; expected only 0 and 1, or only 0 and 255")


@dataclass(frozen=True)
class CaseJob:
    case: Case
    layout: str
    dataset: Path  # the staging folder


@dataclass(frozen=True)
class CaseResult:
    channels: int
    empty: tuple[bool, ...]  # per rater
    dice: tuple[float, ...]  # per pair of raters; two empty masks agree (1.0)


def _write(pixels: np.ndarray, path: Path, geometry: sitk.Image | None) -> None:
    """A PNG (LIDC) or a NIfTI with ``geometry``'s spacing, origin and direction (QUBIQ)."""
    if geometry is None:
        save_png(pixels, path)
        return
    image = sitk.GetImageFromArray(pixels)
    image.CopyInformation(geometry)
    sitk.WriteImage(image, str(path), useCompression=True)


def _read_case(job: CaseJob) -> tuple[np.ndarray, list[np.ndarray], sitk.Image | None]:
    case = job.case
    if job.layout == "lidc":
        channels, geometry = _grey_jpeg(case.image, "image")[None], None
    else:
        channels, geometry = _read_nifti(case.image, "image")
    size = (channels.shape[2], channels.shape[1])
    masks = []
    for path in case.raters:
        if job.layout == "lidc":
            mask = (_grey_jpeg(path, "mask") > JPEG_THRESHOLD).astype(np.uint8)
        else:
            values, _ = _read_nifti(path, "mask")
            if len(values) > 1:
                raise DatasetConversionError(f"mask {path} has {len(values)} channels; expected one 2D slice")
            mask = _binary_nifti(values[0], path)
        check_same_size("image", case.image, size, "rater mask", path, (mask.shape[1], mask.shape[0]))
        masks.append(mask)
    return channels, masks, geometry


def convert_case(job: CaseJob) -> CaseResult:
    """Write one case's image channels, rater masks and majority label. Runs in the worker processes."""
    channels, masks, geometry = _read_case(job)
    case, ending = job.case, LAYOUTS[job.layout].ending
    for i, channel in enumerate(channels):
        _write(channel, job.dataset / f"images{case.part}" / f"{case.name}_{i:04d}{ending}", geometry)
    for r, mask in enumerate(masks, 1):
        _write(mask, job.dataset / RATERS_FOLDER[case.part] / rater_file_name(case.name, r, ending), geometry)
    vote = majority_vote(np.stack(masks)).astype(np.uint8)
    _write(vote, job.dataset / f"labels{case.part}" / f"{case.name}{ending}", geometry)
    dice = tuple(2 * float((a & b).sum()) / (a.sum() + b.sum()) if a.any() or b.any() else 1.0
                 for a, b in combinations(masks, 2))
    return CaseResult(len(channels), tuple(not m.any() for m in masks), dice)


# ---------------------------------------------------------------------------------------------- conversion

def _channel_names(spec: LayoutSpec, cases: list[Case], results: list[CaseResult], given: list[str] | None
                   ) -> dict[str, str]:
    """dataset.json's channel names, once every case is found to have as many channels as the first."""
    first = results[0].channels
    for case, result in zip(cases, results):
        if result.channels != first:
            raise DatasetConversionError(f"image {case.image} has {result.channels} channels but {cases[0].image} "
                                         f"has {first}; every case needs the same channels")
    if given is not None and len(given) != first:
        raise DatasetConversionError(f"--channel_names gives {len(given)} names but the images have {first} "
                                     f"channels (e.g. {cases[0].image})")
    names = given or ([spec.default_channel] if first == 1 else [f"{spec.default_channel} {i}" for i in range(first)])
    return {str(i): name for i, name in enumerate(names)}


def _summary(spec: LayoutSpec, source: Path, target: Path, task: int, cases: list[Case],
             results: list[CaseResult]) -> str:
    lines = [f"{spec.name} layout ({source}) -> {target}"]
    splits = Counter((c.part != "Tr", c.folder.parent.name, c.part) for c in cases)
    lines += [f"  {folder}: {n} cases -> images{part}, labels{part}, raters{part}" for (_, folder, part), n in
              sorted(splits.items())]
    renamed = [c.name for c in cases if c.renamed]
    if renamed:
        lines.append(f"  {len(renamed)} cases renamed as their name is also a training case's: {', '.join(renamed)}")
    num_raters = len(results[0].empty)
    task_text = f" (task {task})" if spec.name == "QUBIQ" else ""
    lines.append(f"  raters: {num_raters}{task_text}; image channels: {results[0].channels}")
    empty = [sum(r.empty[i] for r in results) for i in range(num_raters)]
    lines.append("  empty masks per rater: " + ", ".join(f"rater{i + 1:02d} {n}" for i, n in enumerate(empty))
                 + f" (of {len(cases)} cases)")
    dice = [d for r in results for d in r.dice]
    if dice:
        lines.append(f"  mean pairwise rater Dice: {np.mean(dice):.3f} over {len(dice)} pairs (two empty masks "
                     f"count as agreeing)")
    lines.append(f"  labels: {TIE_RULE}")
    if not any(c.part == "Tr" for c in cases):
        lines.append("  WARNING: no training cases (no training/train folder): nnU-Net cannot train on this dataset")
    return "\n".join(lines)


def _description(spec: LayoutSpec, task: int, num_raters: int, label_name: str) -> str:
    task_text = f", task {task}" if spec.name == "QUBIQ" else ""
    return (f"{spec.description}{task_text}; {num_raters} raters per case. Training split -> imagesTr/labelsTr, "
            f"validation/testing -> imagesTs/labelsTs. Label '{label_name}' is {TIE_RULE}. Every rater's {{0, 1}} mask "
            f"is kept as ratersTr/<case>_rater01{spec.ending} ... (ratersTs for the test split), numbered in the "
            f"release's order.")


def _check_options(dataset_id: int, task: int, name: str | None, label_name: str, num_processes: int) -> None:
    check_num_processes(num_processes)
    if task < 1:
        raise DatasetConversionError(f"--task must be at least 1, got {task}")
    if name is not None and not NAME_PATTERN.fullmatch(name):
        raise DatasetConversionError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    if not label_name.strip() or label_name == "background":
        raise DatasetConversionError(f"--label_name {label_name!r}: give a name other than 'background'")
    dataset_folder_name(dataset_id, "x")  # checks the ID's range


def convert_multirater(source: str | Path, dataset_id: int, task: int = 1, name: str | None = None,
                       label_name: str = DEFAULT_LABEL_NAME, channel_names: list[str] | None = None,
                       overwrite: bool = False, num_processes: int = DEFAULT_NUM_PROCESSES) -> Path:
    """Convert the multi-rater release in ``source`` to ``$nnUNet_raw/Dataset<ID>_<name>``; returns that folder."""
    _check_options(dataset_id, task, name, label_name, num_processes)
    raw = nnunet_raw_folder()
    source = source_folder(source)
    layout, folders = detect_layout(source)
    spec = LAYOUTS[layout]
    if layout == "lidc" and task != 1:
        raise DatasetConversionError(f"--task {task}: the LIDC layout in {source} has no tasks (QUBIQ only)")
    if name is None:
        name = "LIDC" if layout == "lidc" else "QUBIQ" + re.sub(r"[^A-Za-z0-9]", "", source.resolve().name)
        name += f"Task{task}" if task != 1 else ""
    target = check_target_free(raw, dataset_id, dataset_folder_name(dataset_id, name), overwrite)
    cases = collect_cases(layout, folders, task)
    with staged_folder(target) as stage:
        for part in sorted({c.part for c in cases}):
            for kind in ("images", "labels", "raters"):
                (stage / f"{kind}{part}").mkdir()
        jobs = [CaseJob(case, layout, stage) for case in cases]
        results = run_jobs(convert_case, jobs, num_processes, spec.name, "case")
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        generate_dataset_json(
            str(stage), _channel_names(spec, cases, results, channel_names),
            {"background": 0, label_name: 1}, sum(c.part == "Tr" for c in cases), spec.ending, dataset_name=name,
            reference=spec.reference, description=_description(spec, task, len(results[0].empty), label_name),
            license=spec.licence, overwrite_image_reader_writer=spec.reader_writer,
            converted_by="nnDiffSeg_convert_multirater", num_raters=len(results[0].empty))
    print(_summary(spec, source, target, task, cases, results))
    return target


def convert_multirater_entry() -> None:
    parser = converter_parser(
        "nnDiffSeg_convert_multirater",
        "Convert a multi-rater 2D release (QUBIQ's <task>/{Training,Validation}/caseNN or the LIDC crops' "
        "<split>/<n>/image_*.jpg + labelR_.jpg) into an nnU-Net raw dataset: the majority vote of the raters "
        "(strictly more than half; a tie is background) in labelsTr/labelsTs and every rater's mask in "
        "ratersTr/ratersTs. See docs/multirater.md.",
        "QUBIQ task folder (e.g. brain-growth/) holding Training/ and/or Validation/, or the LIDC folder holding "
        "training/ and testing/")
    parser.add_argument("--task", type=int, default=1,
                        help="QUBIQ: which taskNN_ masks to convert (default 1); a second task gets the dataset "
                             "name suffix TaskN")
    parser.add_argument("--name", default=None,
                        help="dataset name (default: QUBIQ + the task folder's name without non-alphanumerics, "
                             "e.g. QUBIQbraingrowth; LIDC for the LIDC layout)")
    parser.add_argument("--label_name", default=DEFAULT_LABEL_NAME,
                        help=f"name of label 1 in dataset.json (default {DEFAULT_LABEL_NAME})")
    parser.add_argument("--channel_names", nargs="+", default=None, metavar="NAME",
                        help="one name per image channel for dataset.json ('CT' selects nnU-Net's CT "
                             "normalisation; default: 'image', or 'image 0', 'image 1', ... for several channels, for "
                             "QUBIQ; 'windowed CT' for LIDC; both z-scored by nnU-Net)")
    run_converter(parser, convert_multirater)


if __name__ == "__main__":
    convert_multirater_entry()
