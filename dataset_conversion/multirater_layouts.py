"""Where a multi-rater release keeps its files: the two layouts nnDiffSeg_convert_multirater recognises (QUBIQ,
the LIDC crops), found from the folder, and each case's image and rater masks, checked for a missing or doubled
file before anything is read. See multirater.py for the conversion itself."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nndiffseg.dataset_conversion.common import DatasetConversionError

SPLIT_FOLDERS = {"training": "Tr", "train": "Tr", "validation": "Ts", "val": "Ts", "testing": "Ts", "test": "Ts"}
JPEG_THRESHOLD = 127  # a JPEG mask pixel above this is foreground


@dataclass(frozen=True)
class LayoutSpec:
    name: str  # "QUBIQ" or "LIDC"
    image: re.Pattern
    mask: re.Pattern  # groups "rater" and (QUBIQ) "task"
    first_rater: int  # the release's number of its first rater
    image_name: str  # the expected image file, for messages
    mask_name: str  # format of a rater's file name: task, rater
    ending: str
    reader_writer: str
    default_channel: str
    reference: str
    licence: str
    description: str


LAYOUTS = {
    "qubiq": LayoutSpec(
        "QUBIQ", re.compile(r"image\.nii(\.gz)?", re.I),
        re.compile(r"task(?P<task>\d+)_seg(?P<rater>\d+)\.nii(\.gz)?", re.I),
        1, "image.nii.gz", "task{task:02d}_seg{rater:02d}.nii.gz", ".nii.gz", "SimpleITKIO", "image",
        "QUBIQ challenge (Quantification of Uncertainties in Biomedical Image Quantification), MICCAI 2020/2021",
        "see the QUBIQ release's terms", "QUBIQ 2D slices, one NIfTI per channel"),
    "lidc": LayoutSpec(
        "LIDC", re.compile(r"image_.*\.jpe?g", re.I), re.compile(r"label(?P<rater>\d+)_\.jpe?g", re.I),
        0, "image_<n+1>.jpg", "label{rater}_.jpg", ".png", "NaturalImage2DIO", "windowed CT",
        "Armato et al., The Lung Image Database Consortium (LIDC) and Image Database Resource Initiative (IDRI), "
        "Med. Phys. 38(2), 2011", "CC BY 3.0 (LIDC-IDRI, The Cancer Imaging Archive)",
        f"LIDC-IDRI lung CT crops, 8-bit grey PNG; JPEG masks thresholded at > {JPEG_THRESHOLD}"),
}
EXPECTED = ("QUBIQ: Training/ and/or Validation/ holding caseNN/image.nii.gz with task01_seg01.nii.gz ...; LIDC: "
            "training/ and/or testing/ holding <n>/image_*.jpg with label0_.jpg ... (split folders: "
            f"{', '.join(SPLIT_FOLDERS)})")


@dataclass(frozen=True)
class Case:
    name: str
    folder: Path  # the case's folder in the release
    part: str  # "Tr" or "Ts"
    image: Path
    raters: tuple[Path, ...]
    renamed: bool = False  # prefixed with its split folder's name: a training case has its name


@dataclass(frozen=True)
class FolderFiles:
    folder: Path
    part: str
    images: tuple[Path, ...]
    masks: dict[int, dict[int, Path]]  # task -> release's rater number -> file


# ---------------------------------------------------------------------------------------------- layout

def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DatasetConversionError(f"cannot list folder {folder}: {e.strerror or e}") from None


def _split_folders(source: Path) -> list[Path]:
    return [p for p in _entries(source) if p.is_dir() and p.name.casefold() in SPLIT_FOLDERS]


def _folder_files(folder: Path, part: str, spec: LayoutSpec) -> FolderFiles:
    images, masks = [], {}
    for entry in _entries(folder):
        match = spec.mask.fullmatch(entry.name)
        if spec.image.fullmatch(entry.name) and entry.is_file():
            images.append(entry)
        elif match and entry.is_file():
            task, rater = int(match.groupdict().get("task") or 1), int(match.group("rater"))
            if rater in masks.setdefault(task, {}):
                raise DatasetConversionError(f"two files for rater {rater}: {masks[task][rater]} and {entry}")
            masks[task][rater] = entry
    return FolderFiles(folder, part, tuple(images), masks)


def detect_layout(source: Path) -> tuple[str, list[FolderFiles]]:
    """The layout ("qubiq" or "lidc") of ``source`` and every case folder's files (folders holding neither an
    image nor a mask of that layout left out)."""
    found: dict[str, list[FolderFiles]] = {}
    for split in _split_folders(source):
        for folder in (p for p in _entries(split) if p.is_dir()):
            for layout, spec in LAYOUTS.items():
                files = _folder_files(folder, SPLIT_FOLDERS[split.name.casefold()], spec)
                if files.images or files.masks:
                    found.setdefault(layout, []).append(files)
    if len(found) > 1:
        shown = [f"{LAYOUTS[k].name} ({', '.join(sorted({str(f.folder.parent) for f in v}))})"
                 for k, v in found.items()]
        raise DatasetConversionError(f"{source} holds several multi-rater layouts: {' and '.join(shown)}; convert one "
                                     f"layout per source folder")
    if not found:
        present = [p.name for p in _entries(source) if p.is_dir()]
        nested = [p for p in _entries(source) if p.is_dir() and _split_folders(p)]
        hint = f" ({nested[0]} looks like one: pass that folder as -i)" if nested else ""
        raise DatasetConversionError(f"unrecognised layout: {source} holds no multi-rater release (found: "
                                     f"{', '.join(present) or 'no folders'}). Expected {EXPECTED}{hint}")
    layout = next(iter(found))
    return layout, found[layout]


def collect_cases(layout: str, folders: list[FolderFiles], task: int) -> list[Case]:
    """The cases with their raters' files for ``task``, checked: one image each, every rater present."""
    spec = LAYOUTS[layout]
    tasks = sorted({t for f in folders for t in f.masks})
    if task not in tasks and tasks:
        raise DatasetConversionError(f"--task {task}: no task{task:02d}_seg* masks in the release; tasks present: "
                                     f"{', '.join(map(str, tasks))}")
    num_raters = max((max(f.masks[task]) - spec.first_rater + 1 for f in folders if f.masks.get(task)), default=0)
    cases = []
    for files in folders:
        raters = files.masks.get(task, {})
        if not files.images:
            first = sorted(p for task_masks in files.masks.values() for p in task_masks.values())[0]
            raise DatasetConversionError(f"mask without image: {first} has no image; expected "
                                         f"{files.folder / spec.image_name}")
        if len(files.images) > 1:
            raise DatasetConversionError(f"two images in {files.folder}: {' and '.join(map(str, files.images))}")
        if not raters:
            expected = files.folder / spec.mask_name.format(task=task, rater=spec.first_rater)
            raise DatasetConversionError(f"image without masks: {files.images[0]} has no rater masks of task {task}; "
                                         f"expected {expected}")
        for rater in range(spec.first_rater, spec.first_rater + num_raters):
            if rater not in raters:
                raise DatasetConversionError(
                    f"missing rater: {files.folder} lacks rater {rater - spec.first_rater + 1} of {num_raters}; "
                    f"expected {files.folder / spec.mask_name.format(task=task, rater=rater)}")
        name = f"lidc{files.folder.name}" if layout == "lidc" else files.folder.name
        numbers = range(spec.first_rater, spec.first_rater + num_raters)
        cases.append(Case(name, files.folder, files.part, files.images[0], tuple(raters[r] for r in numbers)))
    return _unique_names(cases)


def _unique_names(cases: list[Case]) -> list[Case]:
    training = {c.name for c in cases if c.part == "Tr"}
    renamed = [Case(f"{c.folder.parent.name.lower()}_{c.name}", c.folder, c.part, c.image, c.raters, True)
               if c.part != "Tr" and c.name in training else c for c in cases]
    seen: dict[str, Case] = {}
    for case in renamed:
        if case.name in seen:
            raise DatasetConversionError(f"case {case.name} appears twice: {seen[case.name].folder} and {case.folder}")
        seen[case.name] = case
    return renamed
