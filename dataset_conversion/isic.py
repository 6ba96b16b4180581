"""Convert an ISIC skin-lesion segmentation release (ISBI 2016 Part 1, ISIC 2017 Part 1, ISIC 2018 Task 1) into
an nnU-Net v2 raw dataset: one RGB PNG per case (read by nnU-Net's NaturalImage2DIO) and a {0, 1} label PNG.

    nnDiffSeg_convert_isic -i /data/ISIC2017 -d 42            # -> $nnUNet_raw/Dataset042_ISIC2017

Training and Validation cases go to imagesTr/labelsTr (nnU-Net runs its own 5-fold cross-validation), Test cases
to imagesTs/labelsTs. The source folder is only read; the dataset is built in a hidden staging folder beside the
target and moved into place at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

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

# See docs/benchmarks.md, "ISIC --max_size": on the real ISIC 2017 sample (masks up to 1024 px) a 512 px round
# trip (shrink, then scale back to the original size, both nearest) costs the lesion masks 0.43 Dice points on
# average (256: 0.82, 384: 0.60, 768: 0.22), below the 0.5-point budget, while images and nnU-Net's preprocessing
# shrink 4-100x.
DEFAULT_MAX_SIZE = 512

IMAGE_NAME = re.compile(r"ISIC_(\d+)\.(?:jpe?g|png)", re.IGNORECASE)
MASK_NAME = re.compile(r"ISIC_(\d+)_segmentation\.png", re.IGNORECASE)  # 2016 spells it _Segmentation
CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
LABELS = {"background": 0, "lesion": 1}
TRAIN_SPLITS = ("Training", "Validation")
MAX_SKIPPED_SHOWN = 20
# modes Pillow converts to 8-bit RGB itself; of the others, 16-bit and 32-bit grey are rescaled in rgb8
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class SplitSpec:
    name: str
    image_folders: tuple[str, ...]  # accepted spellings, the release's own first
    mask_folders: tuple[str, ...]


@dataclass(frozen=True)
class ReleaseSpec:
    year: int
    release: str
    mask_suffix: str
    licence: str
    reference: str
    splits: tuple[SplitSpec, ...]

    @property
    def training(self) -> SplitSpec:
        return self.splits[0]

    def folder_names(self) -> list[str]:
        return [name for split in self.splits for name in split.image_folders + split.mask_folders]


RELEASES: dict[int, ReleaseSpec] = {
    2016: ReleaseSpec(
        year=2016,
        release="ISBI 2016 ISIC Challenge, Part 1: Lesion Segmentation",
        mask_suffix="_Segmentation.png",
        licence="CC-0",
        reference='Gutman et al., "Skin Lesion Analysis toward Melanoma Detection: A Challenge at the International '
                  'Symposium on Biomedical Imaging (ISBI) 2016, hosted by the International Skin Imaging '
                  'Collaboration (ISIC)", arXiv:1605.01397 (2016)',
        splits=(
            SplitSpec("Training", ("ISBI2016_ISIC_Part1_Training_Data",),
                      ("ISBI2016_ISIC_Part1_Training_GroundTruth",)),
            SplitSpec("Test", ("ISBI2016_ISIC_Part1_Test_Data",), ("ISBI2016_ISIC_Part1_Test_GroundTruth",)),
        ),
    ),
    2017: ReleaseSpec(
        year=2017,
        release="ISIC 2017 Challenge, Part 1: Lesion Segmentation",
        mask_suffix="_segmentation.png",
        licence="CC-0 or CC-BY-NC, per image (see each image's licence in the ISIC Archive)",
        reference='Codella et al., "Skin Lesion Analysis Toward Melanoma Detection: A Challenge at the 2017 '
                  'International Symposium on Biomedical Imaging (ISBI), Hosted by the International Skin Imaging '
                  'Collaboration (ISIC)", IEEE ISBI 2018, arXiv:1710.05006',
        splits=(
            SplitSpec("Training", ("ISIC-2017_Training_Data",), ("ISIC-2017_Training_Part1_GroundTruth",)),
            SplitSpec("Validation", ("ISIC-2017_Validation_Data",), ("ISIC-2017_Validation_Part1_GroundTruth",)),
            SplitSpec("Test", ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_Data"),
                      ("ISIC-2017_Test_v2_Part1_GroundTruth", "ISIC-2017_Test_Part1_GroundTruth")),
        ),
    ),
    2018: ReleaseSpec(
        year=2018,
        release="ISIC 2018 Challenge, Task 1: Lesion Boundary Segmentation",
        mask_suffix="_segmentation.png",
        licence="CC-BY-NC",
        reference='Codella et al., "Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the '
                  'International Skin Imaging Collaboration (ISIC)", arXiv:1902.03368 (2019); Tschandl et al., '
                  '"The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common '
                  'pigmented skin lesions", Scientific Data 5, 180161 (2018)',
        splits=(
            SplitSpec("Training", ("ISIC2018_Task1-2_Training_Input",), ("ISIC2018_Task1_Training_GroundTruth",)),
            SplitSpec("Validation", ("ISIC2018_Task1-2_Validation_Input",), ("ISIC2018_Task1_Validation_GroundTruth",)),
            SplitSpec("Test", ("ISIC2018_Task1-2_Test_Input",), ("ISIC2018_Task1_Test_GroundTruth",)),
        ),
    ),
}


@dataclass(frozen=True)
class IsicSplit:
    name: str  # "Training", "Validation" or "Test"
    images: Path
    masks: Path | None  # None: the release's ground truth for this split is not in SRC

    @property
    def destination(self) -> str:
        """'Tr' or 'Ts': labelled Training/Validation cases train, everything else is for testing."""
        return "Tr" if self.name in TRAIN_SPLITS and self.masks is not None else "Ts"


@dataclass(frozen=True)
class IsicLayout:
    year: int
    source: Path
    splits: tuple[IsicSplit, ...]

    @property
    def release(self) -> ReleaseSpec:
        return RELEASES[self.year]


@dataclass(frozen=True)
class Case:
    case_id: str  # the ISIC id, e.g. ISIC_0000001
    split: IsicSplit
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class CaseJob:
    image: Path
    mask: Path | None
    image_out: Path
    label_out: Path | None
    max_size: int


# ---------------------------------------------------------------------------------------------- layout detection

def _existing(source: Path, names: Iterable[str], what: str) -> Path | None:
    found = [source / n for n in names if (source / n).is_dir()]
    if len(found) > 1:
        raise DatasetConversionError(
            f"{source} holds several {what} folders for the same split: {', '.join(p.name for p in found)}; "
            f"keep only one")
    return found[0] if found else None


def _unrecognised(source: Path) -> DatasetConversionError:
    expected = "; ".join(f"ISIC {spec.year}: {', '.join(spec.folder_names())}" for spec in RELEASES.values())
    present = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    hint = ""
    for sub in present:
        if any((source / sub / name).is_dir() for spec in RELEASES.values() for name in spec.folder_names()):
            hint = f" ({source / sub} looks like one: pass that folder as -i)"
    return DatasetConversionError(
        f"unrecognised layout: {source} holds no ISIC release folders (found: {', '.join(present) or 'no folders'})."
        f" Expected the release's folders directly inside it -- {expected}{hint}")


def detect_isic_layout(source: str | Path) -> IsicLayout:
    """Which ISIC release ``source`` holds (from its folder names only) and which of its splits are present."""
    source = source_folder(source)
    years = [spec.year for spec in RELEASES.values() if any((source / n).is_dir() for n in spec.folder_names())]
    if not years:
        raise _unrecognised(source)
    if len(years) > 1:
        raise DatasetConversionError(
            f"{source} mixes folders of several ISIC releases ({', '.join(map(str, years))}); convert one release "
            f"per source folder")
    spec = RELEASES[years[0]]
    splits = []
    for split_spec in spec.splits:
        images = _existing(source, split_spec.image_folders, f"{split_spec.name} image")
        masks = _existing(source, split_spec.mask_folders, f"{split_spec.name} ground-truth")
        if images is None and masks is not None:
            raise DatasetConversionError(
                f"ground-truth folder {masks} has no image folder: expected {source / split_spec.image_folders[0]}")
        if images is not None:
            splits.append(IsicSplit(split_spec.name, images, masks))
    if not splits or splits[0].name != "Training":
        raise DatasetConversionError(
            f"ISIC {spec.year} layout in {source} has no training images: expected the folder "
            f"{source / spec.training.image_folders[0]}")
    if splits[0].masks is None:
        raise DatasetConversionError(
            f"ISIC {spec.year} training images {splits[0].images} have no ground truth: expected the folder "
            f"{source / spec.training.mask_folders[0]}")
    return IsicLayout(spec.year, source, tuple(splits))


# ---------------------------------------------------------------------------------------------- case collection

def _skip_reason(entry: Path, what: str) -> str:
    if entry.name.startswith("."):
        return "hidden file"
    if entry.is_dir():
        return "a folder"
    if entry.name.lower().endswith("_superpixels.png"):
        return "superpixels"
    return f"not named as an ISIC {what}"


def _scan(folder: Path, pattern: re.Pattern) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """ISIC id -> file for the files of ``folder`` matching ``pattern``, and the other entries, skipped, each
    with why (superpixels, CSVs, licence/attribution text, hidden files, ...)."""
    found: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    what = "mask (ISIC_<digits>_segmentation.png)" if pattern is MASK_NAME else "image (ISIC_<digits>.jpg/.png)"
    for entry in sorted(folder.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file():
            skipped.append((entry, _skip_reason(entry, what)))
            continue
        case_id = f"ISIC_{match.group(1)}"
        if case_id in found:
            raise DatasetConversionError(f"two files for case {case_id}: {found[case_id]} and {entry}; keep one")
        found[case_id] = entry
    return found, skipped


def _split_cases(split: IsicSplit, mask_suffix: str) -> tuple[list[Case], list[tuple[Path, str]]]:
    images, skipped = _scan(split.images, IMAGE_NAME)
    if split.masks is None:
        return [Case(cid, split, images[cid], None) for cid in sorted(images)], skipped
    masks, mask_skipped = _scan(split.masks, MASK_NAME)
    for cid in sorted(images):
        if cid not in masks:
            raise DatasetConversionError(
                f"missing mask: image {images[cid]} has no mask; expected {split.masks / (cid + mask_suffix)}")
    for cid in sorted(masks):
        if cid not in images:
            raise DatasetConversionError(
                f"mask without image: {masks[cid]} has no image; expected {split.images / cid}.jpg")
    return [Case(cid, split, images[cid], masks[cid]) for cid in sorted(images)], skipped + mask_skipped


def collect_cases(layout: IsicLayout) -> tuple[list[Case], list[tuple[Path, str]]]:
    """All cases of ``layout`` with their files, checked for pairing; plus the skipped files and why."""
    cases: list[Case] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[str, Case] = {}
    for split in layout.splits:
        split_cases, split_skipped = _split_cases(split, layout.release.mask_suffix)
        skipped += split_skipped
        for case in split_cases:
            if case.case_id in seen:
                raise DatasetConversionError(
                    f"case {case.case_id} appears twice: {seen[case.case_id].image} and {case.image}")
            seen[case.case_id] = case
        cases += split_cases
    if not any(c.split.name == "Training" for c in cases):
        raise DatasetConversionError(
            f"no training images in {layout.splits[0].images}: expected files named ISIC_<digits>.jpg")
    return cases, skipped


# ---------------------------------------------------------------------------------------------- pixels

def shrunk_size(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(width, height) with the longer side reduced to ``max_size``; unchanged if already small or max_size is 0."""
    width, height = size
    longest = max(width, height)
    if max_size <= 0 or longest <= max_size:
        return size
    return max(1, round(width * max_size / longest)), max(1, round(height * max_size / longest))


def _mask_values(mask: Image.Image, path: Path) -> np.ndarray:
    """The mask as a 2D array, accepting greyscale and grey-stored-as-RGB(A); values are not checked yet."""
    if mask.mode == "1":
        return np.asarray(mask.convert("L"))
    if mask.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(mask)
        refuse_non_finite(values, f"mask {path}")  # RGBA conversion would turn NaN into background
        return values
    rgba = np.asarray(mask.convert("RGBA"))
    if not (np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 0], rgba[..., 2])):
        raise DatasetConversionError(
            f"mask {path} is a colour image (mode {mask.mode} with differing channels); expected a greyscale "
            f"mask with values 0 and 255")
    if (rgba[..., 3] != 255).any():
        raise DatasetConversionError(f"mask {path} has transparent pixels; expected an opaque 0/255 mask")
    return rgba[..., 0]


def _check_binary(values: np.ndarray, path: Path) -> None:
    found = np.unique(values)
    if not set(found.tolist()) <= {0, 255}:
        shown = ", ".join(str(v) for v in found[:10]) + (f", ... ({len(found)} distinct)" if len(found) > 10 else "")
        raise DatasetConversionError(f"mask {path} has values {shown}; expected only 0 (background) and 255 (lesion)")


def _grey8(image: Image.Image, path: Path) -> np.ndarray:
    """A grey image of more than 8 bits reduced to 8 by its type's range, as Pillow reduces 16-bit colour PNGs:
    16-bit values (and Pillow's 32-bit 'I' holding them) to their high byte, floats in 0..1 times 255."""
    values = np.asarray(image)
    refuse_non_finite(values, f"image {path}")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if image.mode in SIXTEEN_BIT_GREY_MODES or (image.mode == "I" and low >= 0 and high <= 65535):
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if image.mode == "F" and low >= 0 and high <= 1:
        return np.round(values * 255).astype(np.uint8)
    kind, expected = ("32-bit float", "0..1") if image.mode == "F" else ("32-bit integer", "0..65535")
    raise DatasetConversionError(
        f"image {path} is a {kind} image (mode {image.mode}) with values {low}..{high}, outside {expected}: it "
        f"has no known 8-bit scale; save it as an 8-bit or 16-bit PNG or a JPEG")


def rgb8(image: Image.Image, path: Path) -> Image.Image:
    """The image as 8-bit RGB. Pillow clips 16-bit grey to 255 when converting (a white image), so grey of more
    than 8 bits is rescaled here; a mode Pillow reads but no 8-bit scale is known for is refused by name."""
    if image.mode in EIGHT_BIT_MODES:
        return image if image.mode == "RGB" else image.convert("RGB")
    if image.mode in SIXTEEN_BIT_GREY_MODES + ("I", "F"):
        return Image.fromarray(_grey8(image, path)).convert("RGB")
    raise DatasetConversionError(
        f"image {path} has mode {image.mode}, which has no known conversion to 8-bit RGB; expected an RGB or "
        f"greyscale JPEG or PNG")


def convert_case(job: CaseJob) -> bool:
    """Write one case's image (and label); returns whether it was shrunk. Runs in the worker processes."""
    image = load_image(job.image, "image")
    label = None
    if job.mask is not None:
        mask = load_image(job.mask, "mask")
        check_same_size("image", job.image, image.size, "mask", job.mask, mask.size)
        values = _mask_values(mask, job.mask)
        _check_binary(values, job.mask)
        label = Image.fromarray((values == 255).astype(np.uint8))
    image = rgb8(image, job.image)
    size = shrunk_size(image.size, job.max_size)
    shrunk = size != image.size
    if shrunk:
        image = image.resize(size, Image.Resampling.LANCZOS)
        if label is not None:
            label = label.resize(size, Image.Resampling.NEAREST)  # nearest keeps the label binary
    save_png(image, job.image_out)
    if label is not None:
        save_png(label, job.label_out)
    return shrunk


# ---------------------------------------------------------------------------------------------- conversion

def _jobs(cases: list[Case], dataset: Path, max_size: int) -> list[CaseJob]:
    jobs = []
    for case in cases:
        part = case.split.destination
        label_out = dataset / f"labels{part}" / f"{case.case_id}.png" if case.mask is not None else None
        jobs.append(CaseJob(case.image, case.mask, dataset / f"images{part}" / f"{case.case_id}_0000.png",
                            label_out, max_size))
    for folder in sorted({j.image_out.parent for j in jobs} | {j.label_out.parent for j in jobs if j.label_out}):
        folder.mkdir(parents=True)
    return jobs


def _description(release: ReleaseSpec, layout: IsicLayout, max_size: int) -> str:
    parts = ", ".join(f"{s.name} -> images{s.destination}" for s in layout.splits)
    size = f"longer side shrunk to at most {max_size} px" if max_size > 0 else "original image size"
    return (f"{release.release}. Dermoscopic RGB images with binary lesion masks (0 background, 1 lesion), "
            f"converted from {parts}; {size}.")


def _write_dataset_json(dataset: Path, layout: IsicLayout, num_training: int, max_size: int) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    release = layout.release
    generate_dataset_json(
        str(dataset), dict(CHANNEL_NAMES), dict(LABELS), num_training, ".png",
        dataset_name=f"ISIC{release.year}", reference=release.reference, release=release.release,
        description=_description(release, layout, max_size), license=release.licence,
        overwrite_image_reader_writer="NaturalImage2DIO", converted_by="nnDiffSeg_convert_isic")


def _summary(target: Path, layout: IsicLayout, cases: list[Case], skipped: list[tuple[Path, str]], shrunk: int,
             max_size: int) -> str:
    lines = [f"ISIC {layout.year} -> {target}"]
    for split in layout.splits:
        count = sum(1 for c in cases if c.split == split)
        if split.masks is not None:
            where = f"images{split.destination}/labels{split.destination}"
        else:
            spec = next(s for s in layout.release.splits if s.name == split.name)
            where = f"imagesTs only (no labels: ground-truth folder {spec.mask_folders[0]} not found)"
        lines.append(f"  {split.name}: {count} cases -> {where}")
    if max_size > 0:
        lines.append(f"  shrunk {shrunk} of {len(cases)} cases to a longer side of {max_size} px")
    lines.append(f"  skipped {len(skipped)} files that are not ISIC images or masks (superpixels, CSV, text, hidden)"
                 + (":" if skipped else ""))
    shown = [f"    {os.path.relpath(path, layout.source)}: {why}" for path, why in skipped
             if why != "superpixels"][:MAX_SKIPPED_SHOWN]
    lines += shown
    if len(skipped) > len(shown):
        lines.append(f"    ... and {len(skipped) - len(shown)} more (superpixels files are not listed)")
    return "\n".join(lines)


def convert_isic(source: str | Path, dataset_id: int, max_size: int = DEFAULT_MAX_SIZE, overwrite: bool = False,
                 num_processes: int = DEFAULT_NUM_PROCESSES) -> Path:
    """Convert the ISIC release in ``source`` to ``$nnUNet_raw/Dataset<ID>_ISIC<year>``; returns that folder."""
    if max_size < 0:
        raise DatasetConversionError(f"--max_size must be 0 (keep the size) or positive, got {max_size}")
    check_num_processes(num_processes)
    raw = nnunet_raw_folder()
    layout = detect_isic_layout(source)
    target = check_target_free(raw, dataset_id, dataset_folder_name(dataset_id, f"ISIC{layout.year}"), overwrite)
    cases, skipped = collect_cases(layout)
    with staged_folder(target) as stage:
        jobs = _jobs(cases, stage, max_size)
        shrunk = sum(run_jobs(convert_case, jobs, num_processes, f"ISIC {layout.year}", "case"))
        num_training = sum(1 for c in cases if c.split.destination == "Tr")
        _write_dataset_json(stage, layout, num_training, max_size)
    print(_summary(target, layout, cases, skipped, shrunk, max_size))
    return target


def convert_isic_entry() -> None:
    parser = converter_parser(
        "nnDiffSeg_convert_isic",
        "Convert an ISIC lesion segmentation release (ISBI 2016 Part 1, ISIC 2017 Part 1, ISIC 2018 Task 1) into an "
        "nnU-Net raw dataset $nnUNet_raw/Dataset<ID>_ISIC<year>. Training and Validation cases go to "
        "imagesTr/labelsTr, Test cases to imagesTs/labelsTs.",
        "folder holding the release's unzipped folders directly, e.g. ISIC-2017_Training_Data and "
        "ISIC-2017_Training_Part1_GroundTruth")
    parser.add_argument("--max_size", type=int, default=DEFAULT_MAX_SIZE,
                        help=f"shrink images whose longer side exceeds this many pixels (never enlarges; 0 keeps "
                             f"the original size). Default {DEFAULT_MAX_SIZE}: shrinking the masks to 512 px and "
                             f"back costs them 0.4 Dice points on average (docs/benchmarks.md), while "
                             f"the originals (up to 6000 px) make preprocessing and training far slower")
    run_converter(parser, convert_isic)


if __name__ == "__main__":
    convert_isic_entry()
