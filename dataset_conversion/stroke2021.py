"""Convert the Stroke2021 brain CT release (TEKNOFEST 2021, Turkish Ministry of Health) into an nnU-Net v2 raw
dataset with labels {background: 0, ischemic: 1, hemorrhagic: 2}, as SDMC-Seg uses it.

    nnDiffSeg_convert_stroke2021 -i /data/stroke2021 -d 42        # -> $nnUNet_raw/Dataset042_Stroke2021

Three layouts of the same release are recognised (see docs/stroke2021.md): the competition's
``TRAINING/{INMEYOK,ISKEMI,KANAMA}/{DICOM,PNG,OVERLAY,MASK}``, the Ministry's public release with Turkish folder
names (``Eğitim Veri Seti_Kanama/Kanama Veri Seti/{PNG,OVERLAY,DICOM}``, ...), matched whatever their Unicode
normalisation, dotted/dotless i or case, and SDMC-Seg's ``Training/{Ischemic,Hemorrhagic,Non-Stroke}/...``.
Masks come from MASK colours where a MASK folder exists, otherwise from the pixels where OVERLAY differs from the
PNG slice. Images are the windowed PNG slices (default) or, with ``--images dicom``, the DICOM in Hounsfield
units as NIfTI. Splits are per slice (the release has no patient IDs): SDMC-Seg's 80/10/10 per class with seed 0
(default) or all slices for nnU-Net's own 5 folds. The source is only read; the dataset is built in a hidden
staging folder beside the target and moved into place at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk
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
    run_converter,
    run_jobs,
    save_png,
    source_folder,
    staged_folder,
)
from nndiffseg.dataset_conversion.dicom_checks import (
    DicomSliceInfo,
    anomaly_warnings,
    refuse_non_finite_hu,
    rescale_anomalies,
)

DATASET_NAME = "Stroke2021"
LABELS = {"background": 0, "ischemic": 1, "hemorrhagic": 2}
CATEGORIES = ("ischemic", "hemorrhagic", "nonstroke")
STROKE_CATEGORIES = ("ischemic", "hemorrhagic")
CATEGORY_LABEL = {"nonstroke": 0, "ischemic": 1, "hemorrhagic": 2}
CATEGORY_TITLE = {"ischemic": "ischemic", "hemorrhagic": "hemorrhagic", "nonstroke": "non-stroke"}
ISCHEMIA_COLOUR = (0, 0, 255)  # MASK colours as the competition's info note gives them
HEMORRHAGE_COLOUR = (0, 255, 0)
COLOUR_NAMES = {ISCHEMIA_COLOUR: "blue", HEMORRHAGE_COLOUR: "green"}
IMAGE_MODES = ("png", "dicom")
FILE_ENDING = {"png": ".png", "dicom": ".nii.gz"}
READER_WRITER = {"png": "NaturalImage2DIO", "dicom": "SimpleITKIO"}
# "CT" selects nnU-Net's CT normalisation (dataset-wide HU percentiles); anything else is z-scored per image
CHANNEL_NAME = {"png": "windowed CT", "dicom": "CT"}
SPLITS = ("sdmcseg", "nnunet")
SPLIT_SEED = 0
MINISTRY_SEARCH_DEPTH = 4
IGNORED_FOLDERS = {"__macosx"}  # macOS zips mirror the whole tree there, with "._" resource-fork files
LEAKAGE_WARNING = ("splits are per slice: the release has no patient IDs, so slices of one patient can fall into "
                   "both training and test (patient leakage; test scores are optimistic)")
REFERENCE = ('Koç U, Akçapınar Sezer E, Alper Özkaya Y, et al. "Artificial intelligence in healthcare competition '
             '(TEKNOFEST-2021): Stroke data set." Eurasian J Med 54(3):248-258 (2022)')
RELEASE = ("Artificial Intelligence in Healthcare Competition (TEKNOFEST 2021) stroke data set, Turkish Ministry "
           "of Health (acikveri.saglik.gov.tr)")
LICENCE = "see the release's terms at acikveri.saglik.gov.tr (SDMC-Seg's preparation lists CC-BY-SA 4.0)"

# Class folder names as name keys (see name_key): the competition's and SDMC-Seg's folders are named so; the
# Ministry's hold the Turkish ones as words inside longer names ("Kanama Veri Seti", "İnme Yok_..._PNG").
TURKISH_CLASSES = {"iskemi": "ischemic", "kanama": "hemorrhagic", "inmeyok": "nonstroke"}
ENGLISH_CLASSES = {c: c for c in CATEGORIES}
DATA_KINDS = ("png", "overlay", "mask", "dicom")  # subfolder keys: PNG, OVERLAY, MASK, DICOM
KIND_TITLE = {"png": "PNG", "overlay": "OVERLAY", "mask": "MASK", "dicom": "DICOM"}
FILE_SUFFIX = {"png": ".png", "overlay": ".png", "mask": ".png", "dicom": ".dcm"}
EXPECTED_LAYOUTS = ("TRAINING/{INMEYOK,ISKEMI,KANAMA}/{PNG,OVERLAY,MASK,DICOM} (competition); "
                    "'Eğitim Veri Seti_Kanama/Kanama Veri Seti/{PNG,OVERLAY,DICOM}', 'Eğitim Veri Seti_İskemi/"
                    "İskemi Veri Seti/...' and 'İnme Yok_kronik süreç_diğer Veri Set_PNG' (Ministry release); "
                    "Training/{Ischemic,Hemorrhagic,Non-Stroke}/{PNG,OVERLAY,DICOM} (SDMC-Seg)")


# ---------------------------------------------------------------------------------------------- names

def fold_name(name: str) -> str:
    """``name`` without case, diacritics or the dotted/dotless i distinction, whatever its Unicode normal form:
    'Eğitim Veri Seti_İskemi', its NFD spelling, 'EĞİTİM VERİ SETİ_İSKEMİ' and 'Egıtım Verı Setı_Iskemı' all
    give 'egitim veri seti_iskemi'."""
    decomposed = unicodedata.normalize("NFKD", name)  # İ -> I + combining dot, ğ -> g + breve, ...
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return bare.replace("ı", "i").casefold()  # ı (dotless) has no decomposition


def name_key(name: str) -> str:
    """fold_name without spaces, underscores or hyphens: 'Non-Stroke' -> 'nonstroke', 'İnme Yok' -> 'inmeyok'."""
    return re.sub(r"[\s_\-]+", "", fold_name(name))


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name.casefold() not in IGNORED_FOLDERS)
    except OSError as e:
        raise DatasetConversionError(f"cannot list folder {folder}: {e.strerror or e}") from None


def _keyed_subfolders(folder: Path) -> dict[str, Path]:
    """name key -> subfolder; two subfolders with the same key (e.g. 'PNG' and 'png') are an error."""
    found: dict[str, Path] = {}
    for sub in _visible_dirs(folder):
        key = name_key(sub.name)
        if key in found:
            raise DatasetConversionError(
                f"{folder} holds two folders that name the same thing: '{found[key].name}' and '{sub.name}'; keep one")
        found[key] = sub
    return found


# ---------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class ClassFolders:
    category: str  # "ischemic", "hemorrhagic" or "nonstroke"
    folder: Path  # the class folder (for the Ministry's non-stroke slices: their PNG folder)
    png: Path
    overlay: Path | None = None
    mask: Path | None = None
    dicom: Path | None = None

    @property
    def mask_source(self) -> str | None:
        """Where lesion masks come from: 'mask' (MASK colours), 'overlay' (OVERLAY against PNG), None (no lesions)."""
        if self.category == "nonstroke":
            return None
        return "mask" if self.mask is not None else "overlay"


@dataclass(frozen=True)
class Stroke2021Layout:
    kind: str  # "competition", "ministry" or "sdmcseg"
    source: Path
    classes: dict[str, ClassFolders]  # category -> folders; no entry where the release part is absent

    def shown(self, path: Path) -> str:
        """``path`` relative to the source, for the summary."""
        try:
            shown = str(path.relative_to(self.source)) or "."
        except ValueError:
            shown = str(path)
        return unicodedata.normalize("NFC", shown)  # NFD names would misalign the table


def _class_folders(category: str, folder: Path) -> ClassFolders:
    subs = _keyed_subfolders(folder)
    if "png" not in subs:
        raise DatasetConversionError(
            f"{CATEGORY_TITLE[category]} folder {folder} has no PNG folder (found: "
            f"{', '.join(p.name for p in subs.values()) or 'no folders'})")
    kinds = {kind: subs.get(kind) for kind in DATA_KINDS}
    if category == "nonstroke":
        kinds["overlay"] = kinds["mask"] = None  # non-stroke slices have no lesions to draw
    return ClassFolders(category, folder, **kinds)


def _named_classes(source: Path, names: dict[str, str]) -> dict[str, Path] | None:
    """category -> class folder where ``source`` or its TRAINING folder holds class folders named as in ``names``
    (name keys), at least one of them with a PNG folder; None otherwise (a Ministry download whose outer folders
    a user renamed 'kanama', ... is then searched as such)."""
    roots = [source] + [p for p in _visible_dirs(source) if name_key(p.name) == "training"]
    for root in roots:
        found = {names[key]: sub for key, sub in _keyed_subfolders(root).items() if key in names}
        if any("png" in _keyed_subfolders(folder) for folder in found.values()):
            return found
    return None


def _holds_files(folder: Path, suffix: str) -> bool:
    try:
        return any(p.suffix.lower() == suffix and p.is_file() for p in folder.iterdir())
    except OSError:
        return False


def _ministry_candidates(folder: Path, depth: int, claimed: frozenset[Path]) -> Iterator[tuple[str, Path]]:
    """(role, folder) for the Ministry release's folders at most ``depth`` levels below ``folder``, outside the
    ``claimed`` class folders of another layout (the competition's 'KANAMA' would match). Roles:
    'ischemic', 'hemorrhagic', 'nonstroke' (a class folder holding a PNG folder) and 'nonstroke png' /
    'nonstroke dicom' (the non-stroke zips' folders, holding the files directly). The outer zip folders
    ('Eğitim Veri Seti_Kanama', a doubled 'İnme Yok..._PNG') hold no data themselves and are walked through."""
    for sub in _visible_dirs(folder):
        if sub in claimed:
            continue
        key = name_key(sub.name)
        category = next((c for word, c in TURKISH_CLASSES.items() if word in key), None)
        if category is not None:
            if "png" in _keyed_subfolders(sub):
                yield category, sub
                continue
            if category == "nonstroke" and _holds_files(sub, ".png"):
                yield "nonstroke png", sub
                continue
            if category == "nonstroke" and _holds_files(sub, ".dcm"):
                yield "nonstroke dicom", sub
                continue
        if depth > 1:
            yield from _ministry_candidates(sub, depth - 1, claimed)


def _ministry_classes(source: Path, roles: dict[str, list[Path]]) -> dict[str, ClassFolders]:
    for role, folders in roles.items():
        if len(folders) > 1:
            raise DatasetConversionError(
                f"{source} holds several folders of {role.replace('nonstroke', 'non-stroke')} slices: "
                f"{' and '.join(map(str, folders))}; keep one, or pass as -i a folder that holds one copy")
    classes = {c: _class_folders(c, roles[c][0]) for c in CATEGORIES if c in roles}
    if "nonstroke" not in classes and "nonstroke png" in roles:
        dicom = roles.get("nonstroke dicom", [None])[0]
        classes["nonstroke"] = ClassFolders("nonstroke", roles["nonstroke png"][0], roles["nonstroke png"][0],
                                            dicom=dicom)
    return classes


def _unrecognised(source: Path) -> DatasetConversionError:
    present = [p.name for p in _visible_dirs(source)]
    return DatasetConversionError(
        f"unrecognised layout: {source} holds no Stroke2021 class folders "
        f"(found: {', '.join(present) or 'no folders'})."
        f" Expected one of: {EXPECTED_LAYOUTS}")


def _refuse_mixed_layouts(source: Path, layouts: dict[str, list[Path]]) -> None:
    """One layout per source: of two, the converter would pick one and never mention the other."""
    if len(layouts) < 2:
        return
    shown = [f"{kind} ({', '.join(map(str, sorted({source / f.relative_to(source).parts[0] for f in folders})))})"
             for kind, folders in layouts.items()]
    raise DatasetConversionError(
        f"{source} holds several Stroke2021 layouts: {' and '.join(shown)}; "
        f"convert one layout per source folder: move the other's folders away, or pass as -i a folder that holds "
        f"only one")


def detect_stroke2021_layout(source: str | Path) -> Stroke2021Layout:
    """Which of the release's three layouts ``source`` holds (from folder names only) and its class folders."""
    source = source_folder(source)
    found = {kind: _named_classes(source, names)
             for kind, names in (("competition", TURKISH_CLASSES), ("sdmcseg", ENGLISH_CLASSES))}
    layouts = {kind: list(folders.values()) for kind, folders in found.items() if folders is not None}
    roles: dict[str, list[Path]] = {}
    for role, folder in _ministry_candidates(source, MINISTRY_SEARCH_DEPTH,
                                             frozenset(f for folders in layouts.values() for f in folders)):
        roles.setdefault(role, []).append(folder)
    if roles:
        layouts["ministry"] = [f for folders in roles.values() for f in folders]
    _refuse_mixed_layouts(source, layouts)
    kind = next(iter(layouts), "ministry")
    classes = (_ministry_classes(source, roles) if kind == "ministry"
               else {c: _class_folders(c, folder) for c, folder in found[kind].items()})
    if not any(c in classes for c in STROKE_CATEGORIES):
        raise _unrecognised(source)
    for category in STROKE_CATEGORIES:
        folders = classes.get(category)
        if folders is not None and folders.mask is None and folders.overlay is None:
            raise DatasetConversionError(
                f"{CATEGORY_TITLE[category]} folder {folders.folder} has neither a MASK nor an OVERLAY folder: the "
                f"lesion masks of its slices cannot be derived")
    return Stroke2021Layout(kind, source, {c: classes[c] for c in CATEGORIES if c in classes})


# ---------------------------------------------------------------------------------------------- slices

@dataclass(frozen=True)
class Slice:
    case_id: str  # the release's slice id (file name without ending)
    category: str
    png: Path
    overlay: Path | None = None
    mask: Path | None = None
    dicom: Path | None = None


@dataclass
class SliceCollection:
    slices: list[Slice]  # to convert, sorted by case id
    found: Counter  # category -> PNG slices found (excluded categories included)
    skipped: dict[str, Counter]  # category -> reason -> count
    ignored_files: int  # files that are no slice (hidden, other endings)


def _scan(folder: Path, suffix: str) -> tuple[dict[str, Path], int]:
    """slice id -> file for the ``suffix`` files of ``folder`` (ending in any case), and how many other entries
    were ignored (hidden files, Thumbs.db, text, ...)."""
    found: dict[str, Path] = {}
    ignored = 0
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.suffix.lower() != suffix or not entry.is_file():
            ignored += 1
            continue
        if entry.stem in found:
            raise DatasetConversionError(f"two files for slice {entry.stem}: {found[entry.stem]} and {entry}; keep one")
        found[entry.stem] = entry
    return found, ignored


def _collect_category(folders: ClassFolders, pngs: dict[str, Path], needed: tuple[str, ...], strict: bool
                      ) -> tuple[list[Slice], Counter, int]:
    """The category's slices with the files in ``needed``; (slices, skipped reasons, ignored files)."""
    ignored = 0
    files: dict[str, dict[str, Path]] = {}
    for kind in needed:
        files[kind], kind_ignored = _scan(getattr(folders, kind), FILE_SUFFIX[kind])
        ignored += kind_ignored
        for case_id, path in sorted(files[kind].items()):
            if case_id not in pngs:
                raise DatasetConversionError(
                    f"{KIND_TITLE[kind]} {path} has no PNG slice: expected {folders.png / (case_id + '.png')}")
    slices, skipped = [], Counter()
    for case_id, png in sorted(pngs.items()):
        missing = [kind for kind in needed if case_id not in files[kind]]
        if missing:
            kind = missing[0]
            expected = getattr(folders, kind) / (case_id + FILE_SUFFIX[kind])
            if strict:
                raise DatasetConversionError(
                    f"PNG slice {png} has no {KIND_TITLE[kind]} file: expected {expected} (--strict)")
            skipped[f"no {KIND_TITLE[kind]} file"] += 1
            continue
        slices.append(Slice(case_id, folders.category, png, **{kind: files[kind][case_id] for kind in needed}))
    return slices, skipped, ignored


def collect_slices(layout: Stroke2021Layout, images: str, include_nonstroke: bool, strict: bool) -> SliceCollection:
    """The slices to convert, each with the files it needs, checked for pairing and unique ids."""
    all_slices: list[Slice] = []
    found, skipped, ignored = Counter(), {}, 0
    first_png: dict[str, Path] = {}
    for category, folders in layout.classes.items():
        converting = category != "nonstroke" or include_nonstroke
        needed: tuple[str, ...] = ()
        if converting:
            needed = tuple(k for k in (folders.mask_source,) if k) + (("dicom",) if images == "dicom" else ())
            if images == "dicom" and folders.dicom is None:
                raise DatasetConversionError(
                    f"--images dicom: the {CATEGORY_TITLE[category]} slices in {folders.folder} have no DICOM folder")
        pngs, png_ignored = _scan(folders.png, ".png")
        for case_id, png in pngs.items():
            if case_id in first_png:
                raise DatasetConversionError(
                    f"slice id {case_id} appears in two class folders: {first_png[case_id]} and {png}")
            first_png[case_id] = png
        slices, skipped[category], category_ignored = _collect_category(folders, pngs, needed, strict)
        found[category] = len(pngs)
        ignored += png_ignored + category_ignored
        if converting:
            all_slices += slices
    return SliceCollection(sorted(all_slices, key=lambda s: s.case_id), found, skipped, ignored)


# ---------------------------------------------------------------------------------------------- pixels

@dataclass(frozen=True)
class SliceJob:
    item: Slice
    images: str  # "png" or "dicom"
    out_folder: Path  # the staging folder for converted slices
    ischemia_colour: tuple[int, int, int]
    hemorrhage_colour: tuple[int, int, int]
    strict: bool


@dataclass(frozen=True)
class SliceResult:
    case_id: str
    category: str
    skip_reason: str | None = None
    lesion_pixels: tuple[int, int] = (0, 0)  # label 1, label 2
    mask_colours: tuple[tuple[int, int, int], ...] = ()  # non-black MASK colours found
    hu_range: tuple[float, float] | None = None  # --images dicom
    dicom: DicomSliceInfo | None = None  # --images dicom


def _grey_slice(image: Image.Image, path: Path) -> np.ndarray:
    """The 8-bit windowed slice as a 2D array; grey stored as RGB(A) is accepted, alpha is ignored."""
    if image.mode == "L":
        return np.asarray(image)
    if image.mode not in ("LA", "RGB", "RGBA", "P"):
        raise DatasetConversionError(
            f"PNG slice {path} has mode {image.mode}; expected an 8-bit greyscale (or grey RGB) windowed slice")
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise DatasetConversionError(f"PNG slice {path} is a colour image (its channels differ); expected a grey slice")
    return rgb[..., 0]


def _packed(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _colour_text(colour: tuple[int, int, int]) -> str:
    return f"({colour[0]}, {colour[1]}, {colour[2]})"


def labels_from_mask(rgb: np.ndarray, path: Path, ischemia_colour: tuple[int, int, int],
                     hemorrhage_colour: tuple[int, int, int]) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    """Label map of an RGB MASK (the colour decides the label) and the non-black colours it holds."""
    packed = _packed(rgb)
    values, counts = np.unique(packed, return_counts=True)
    known = {0, int(_packed(np.array(ischemia_colour))), int(_packed(np.array(hemorrhage_colour)))}
    unknown = [(int(v), int(n)) for v, n in zip(values, counts) if int(v) not in known]
    if unknown:
        shown = ", ".join(f"{_colour_text(((v >> 16) & 255, (v >> 8) & 255, v & 255))} in {n} px"
                          for v, n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetConversionError(
            f"MASK {path} has colours that are neither class: {shown}; expected black background, ischemia "
            f"{_colour_text(ischemia_colour)} and hemorrhage {_colour_text(hemorrhage_colour)}")
    labels = np.zeros(packed.shape, np.uint8)
    labels[packed == _packed(np.array(ischemia_colour))] = 1
    labels[packed == _packed(np.array(hemorrhage_colour))] = 2
    colours = tuple(((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in map(int, values) if v != 0)
    return labels, colours


def labels_from_overlay(overlay_rgb: np.ndarray, grey: np.ndarray, label: int) -> np.ndarray:
    """SDMC-Seg's rule: ``label`` wherever the overlay's RGB differs from the grey slice (fill and outline)."""
    return (np.any(overlay_rgb != grey[..., None], axis=-1) * label).astype(np.uint8)


def _itk_message(error: Exception) -> str:
    text = str(error)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return " ".join(text.split())


def read_dicom_hu(path: Path) -> tuple[np.ndarray, DicomSliceInfo]:
    """The slice in Hounsfield units (GDCM applies RescaleSlope/Intercept), refused where not finite, and its
    (x, y) pixel spacing and anomalies."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise DatasetConversionError(
            f"cannot read DICOM {path}: {_itk_message(e)} (corrupt file, or not DICOM?)") from None
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1 or (len(size) == 3 and size[2] != 1):
        raise DatasetConversionError(
            f"DICOM {path} is not a single greyscale slice (size {'x'.join(map(str, size))}, "
            f"{image.GetNumberOfComponentsPerPixel()} components)")
    hu = sitk.GetArrayFromImage(image).reshape(size[1], size[0])
    if np.issubdtype(hu.dtype, np.integer) and hu.min() >= -32768 and hu.max() <= 32767:
        hu = hu.astype(np.int16)
    else:
        hu = hu.astype(np.float32)  # a non-integer RescaleSlope
    refuse_non_finite_hu(hu, path, reader)
    spacing = (float(image.GetSpacing()[0]), float(image.GetSpacing()[1]))
    return hu, DicomSliceInfo(path, spacing, rescale_anomalies(reader))


def _write_nifti(pixels: np.ndarray, spacing: tuple[float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)


def _lesion_labels(job: SliceJob, grey: np.ndarray, png_size: tuple[int, int]
                   ) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    item = job.item
    if item.category == "nonstroke":
        return np.zeros(grey.shape, np.uint8), ()
    if item.mask is not None:
        mask = load_image(item.mask, "MASK")
        check_same_size("PNG slice", item.png, png_size, "MASK", item.mask, mask.size)
        return labels_from_mask(np.asarray(mask.convert("RGB")), item.mask, job.ischemia_colour,
                                job.hemorrhage_colour)
    overlay = load_image(item.overlay, "OVERLAY")
    check_same_size("PNG slice", item.png, png_size, "OVERLAY", item.overlay, overlay.size)
    return labels_from_overlay(np.asarray(overlay.convert("RGB")), grey, CATEGORY_LABEL[item.category]), ()


def _empty_lesion_reason(item: Slice) -> str:
    return "MASK has no lesion pixels" if item.mask is not None else "OVERLAY identical to PNG (no lesion drawn)"


def convert_slice(job: SliceJob) -> SliceResult:
    """Write one slice's image and label into the staging folder. Runs in the worker processes."""
    item = job.item
    png = load_image(item.png, "PNG slice")
    grey = _grey_slice(png, item.png)
    labels, colours = _lesion_labels(job, grey, png.size)
    if item.category != "nonstroke" and not labels.any():
        reason = _empty_lesion_reason(item)
        if job.strict:
            problem = (f"MASK {item.mask} has no lesion pixels" if item.mask is not None
                       else f"OVERLAY {item.overlay} is identical to its PNG slice {item.png}")
            raise DatasetConversionError(
                f"{problem}: no lesion on {CATEGORY_TITLE[item.category]} slice {item.case_id} (--strict)")
        return SliceResult(item.case_id, item.category, skip_reason=reason, mask_colours=colours)
    lesion_pixels = (int((labels == 1).sum()), int((labels == 2).sum()))
    if job.images == "dicom":
        hu, dicom = read_dicom_hu(item.dicom)
        check_same_size("PNG slice", item.png, png.size, "DICOM", item.dicom, (hu.shape[1], hu.shape[0]))
        _write_nifti(hu, dicom.spacing, job.out_folder / f"{item.case_id}_0000.nii.gz")
        _write_nifti(labels, dicom.spacing, job.out_folder / f"{item.case_id}.nii.gz")
        return SliceResult(item.case_id, item.category, None, lesion_pixels, colours,
                           (float(hu.min()), float(hu.max())), dicom)
    save_png(grey, job.out_folder / f"{item.case_id}_0000.png")
    save_png(labels, job.out_folder / f"{item.case_id}.png")
    return SliceResult(item.case_id, item.category, None, lesion_pixels, colours)


# ---------------------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class SliceSplit:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def sdmcseg_split(case_ids: Iterable[str], seed: int = SPLIT_SEED) -> SliceSplit:
    """SDMC-Seg's protocol for one class: the ids sorted (as strings), permuted by
    ``np.random.default_rng(seed).permutation``, then the first floor(0.8 n) train, the next floor(0.1 n) val,
    the rest test."""
    ordered = sorted(case_ids)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    n_train, n_val = len(ordered) * 8 // 10, len(ordered) // 10
    return SliceSplit(tuple(sorted(shuffled[:n_train])), tuple(sorted(shuffled[n_train:n_train + n_val])),
                      tuple(sorted(shuffled[n_train + n_val:])))


def empty_split_warnings(splits: dict[str, SliceSplit]) -> list[str]:
    """SDMC-Seg's rounding down leaves a class with under 10 slices no validation (or test) slice; with no
    validation slice at all, fold 0 cannot be trained."""
    warnings = [f"WARNING: {category}: {len(s.train) + len(s.val) + len(s.test)} slices give "
                f"{' and '.join(p for p, ids in (('no validation', s.val), ('no test', s.test)) if not ids)} slice"
                for category, s in splits.items() if not s.val or not s.test]
    if not any(s.val for s in splits.values()):
        warnings.append("WARNING: fold 0 of splits_final.json has no validation slices, so nnDiffSeg_train refuses "
                        "it; convert with --split nnunet (nnU-Net's own 5 folds) or train fold 'all'")
    return warnings


def split_by_category(kept: dict[str, list[str]], split: str) -> dict[str, SliceSplit]:
    if split == "nnunet":
        return {c: SliceSplit(tuple(sorted(ids)), (), ()) for c, ids in kept.items()}
    return {c: sdmcseg_split(ids) for c, ids in kept.items()}


# ---------------------------------------------------------------------------------------------- output

def _move_into_place(stage: Path, pending: Path, splits: dict[str, SliceSplit], ending: str) -> None:
    for category_split in splits.values():
        for part, ids in (("Tr", category_split.train + category_split.val), ("Ts", category_split.test)):
            for case_id in ids:
                for name, folder in ((f"{case_id}_0000{ending}", f"images{part}"),
                                     (f"{case_id}{ending}", f"labels{part}")):
                    (stage / folder).mkdir(exist_ok=True)
                    os.replace(pending / name, stage / folder / name)
    pending.rmdir()


def _description(layout: Stroke2021Layout, images: str, split: str, include_nonstroke: bool) -> str:
    images = ("brain-windowed PNG slices (8 bit, one channel)" if images == "png"
              else "DICOM slices in Hounsfield units (NIfTI, pixel spacing kept)")
    split_text = ("SDMC-Seg's split: 80/10/10 % per class with seed 0; test slices in imagesTs/labelsTs, "
                  "fold 0 of splits_final.json = its train/val" if split == "sdmcseg"
                  else "all slices in imagesTr for nnU-Net's 5-fold cross-validation")
    classes = "stroke and non-stroke slices" if include_nonstroke else "stroke slices only (as SDMC-Seg)"
    return (f"Non-contrast brain CT slices with ischemic and hemorrhagic stroke lesions, from the {layout.kind} "
            f"layout; {classes}; images: {images}; {split_text}. Warning: {LEAKAGE_WARNING}.")


def _write_dataset_json(dataset: Path, layout: Stroke2021Layout, images: str, num_training: int, split: str,
                        include_nonstroke: bool) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        str(dataset), {"0": CHANNEL_NAME[images]}, dict(LABELS), num_training, FILE_ENDING[images],
        dataset_name=DATASET_NAME, reference=REFERENCE, release=RELEASE,
        description=_description(layout, images, split, include_nonstroke), license=LICENCE,
        overwrite_image_reader_writer=READER_WRITER[images],
        converted_by="nnDiffSeg_convert_stroke2021")


def _write_splits_file(dataset: Path, splits: dict[str, SliceSplit]) -> None:
    """One fold: SDMC-Seg's train/val. nnU-Net's planner copies it into nnUNet_preprocessed."""
    fold = {"train": sorted(c for s in splits.values() for c in s.train),
            "val": sorted(c for s in splits.values() for c in s.val)}
    (dataset / "splits_final.json").write_text(json.dumps([fold], indent=4) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- summary

@dataclass
class ConversionReport:
    layout: Stroke2021Layout
    target: Path
    images: str
    split: str
    include_nonstroke: bool
    collection: SliceCollection
    results: list[SliceResult]
    splits: dict[str, SliceSplit]
    colours: dict[str, Counter] = field(default_factory=dict)  # category with a MASK folder -> colour -> files

    def skipped(self, category: str) -> Counter:
        reasons = Counter(self.collection.skipped.get(category, Counter()))
        reasons.update(r.skip_reason for r in self.results if r.category == category and r.skip_reason)
        return reasons

    def lesion_pixels(self, category: str) -> tuple[int, int]:
        kept = [r for r in self.results if r.category == category and not r.skip_reason]
        return sum(r.lesion_pixels[0] for r in kept), sum(r.lesion_pixels[1] for r in kept)


def mask_colour_counts(results: list[SliceResult], layout: Stroke2021Layout) -> dict[str, Counter]:
    counts = {c: Counter() for c, f in layout.classes.items() if f.mask_source == "mask"}
    for r in results:
        if r.category in counts:
            counts[r.category].update(r.mask_colours)
    return counts


def _colour_label(colour: tuple[int, int, int], ischemia: tuple[int, int, int]) -> str:
    meaning = "ischemic" if colour == ischemia else "hemorrhagic"
    return f"{_colour_text(colour)} {COLOUR_NAMES.get(colour, '')} = {meaning}".replace("  ", " ")


def swap_warnings(colours: dict[str, Counter], layout: Stroke2021Layout, ischemia: tuple[int, int, int],
                  hemorrhage: tuple[int, int, int]) -> list[str]:
    """A warning per stroke MASK folder whose painted MASKs all lack the folder's own class colour."""
    own = {"ischemic": ischemia, "hemorrhagic": hemorrhage}
    warnings = []
    for category, counts in colours.items():
        if category in own and sum(counts.values()) and counts[own[category]] == 0:
            warnings.append(
                f"WARNING: no MASK in {layout.shown(layout.classes[category].mask)} ({CATEGORY_TITLE[category]} "
                f"slices) holds the {CATEGORY_TITLE[category]} colour {_colour_text(own[category])}; they are "
                f"painted {', '.join(map(_colour_text, sorted(counts)))}. If the colours are swapped in your copy, "
                f"convert again with --swap_mask_colours --overwrite")
    return warnings


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]


def summary(report: ConversionReport, ischemia: tuple[int, int, int], hemorrhage: tuple[int, int, int]) -> str:
    layout = report.layout
    lines = [f"Stroke2021 ({layout.kind} layout, {layout.source}) -> {report.target}"]
    rows = [["class", "folder", "found", "written", "train", "val", "test", "skipped", "label-1 px", "label-2 px"]]
    totals = np.zeros(8, np.int64)
    for category, folders in layout.classes.items():
        if category == "nonstroke" and not report.include_nonstroke:
            rows.append([CATEGORY_TITLE[category], layout.shown(folders.folder), str(report.collection.found[category]),
                         "-", "-", "-", "-", "-", "-", "-"])
            continue
        split = report.splits.get(category, SliceSplit((), (), ()))
        pixels = report.lesion_pixels(category)
        numbers = [report.collection.found[category], len(split.train) + len(split.val) + len(split.test),
                   len(split.train), len(split.val), len(split.test), sum(report.skipped(category).values()), *pixels]
        totals += numbers
        rows.append([CATEGORY_TITLE[category], layout.shown(folders.folder)] + [str(n) for n in numbers])
    rows.append(["total", ""] + [str(n) for n in totals])
    lines += _table(rows)
    if "nonstroke" in layout.classes and not report.include_nonstroke:
        lines.append("  non-stroke slices excluded, as SDMC-Seg trains on stroke slices only (--include_nonstroke "
                     "adds them with empty masks)")
    for category in layout.classes:
        reasons = report.skipped(category)
        if reasons:
            lines.append(f"  skipped {CATEGORY_TITLE[category]}: "
                         + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())))
    if report.collection.ignored_files:
        lines.append(f"  ignored {report.collection.ignored_files} files that are no slices "
                     f"(hidden files, other endings)")
    for category, counts in report.colours.items():
        found = ", ".join(f"{_colour_label(c, ischemia)} in {n} files" for c, n in sorted(counts.items())) or "none"
        lines.append(f"  MASK colours in {layout.shown(layout.classes[category].mask)}: {found}")
    if any(layout.classes[c].mask_source == "overlay" for c in STROKE_CATEGORIES if c in layout.classes):
        lines.append("  masks without a MASK folder: pixels where OVERLAY's RGB differs from the PNG (outline "
                     "included), set to the folder's class")
    if report.images == "dicom":
        ranges = [r.hu_range for r in report.results if r.hu_range]
        if ranges:
            low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
            lines.append(f"  images: DICOM in HU, range {low:g} to {high:g} over all slices")
            if low > -500:
                lines.append("  WARNING: no slice holds air (below -500 HU): the DICOM files may lack "
                             "RescaleIntercept, so the values would not be HU")
            lines += ["  " + w for w in anomaly_warnings([r.dicom for r in report.results if r.dicom])]
    else:
        lines.append("  images: the windowed PNG slices, one channel (z-scored by nnU-Net)")
    if report.split == "sdmcseg":
        lines.append("  split: SDMC-Seg's 80/10/10 % per class, seed 0: train+val -> imagesTr/labelsTr, test -> "
                     "imagesTs/labelsTs; splits_final.json holds one fold (train with fold 0; folds 1-4 do not exist)")
        lines += ["  " + w for w in empty_split_warnings(report.splits)]
    else:
        lines.append("  split: all slices -> imagesTr/labelsTr; nnU-Net makes its own 5 folds")
    lines.append(f"  WARNING: {LEAKAGE_WARNING}")
    lines += ["  " + w for w in swap_warnings(report.colours, layout, ischemia, hemorrhage)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- conversion

def _check_options(dataset_id: int, images: str, split: str, num_processes: int) -> None:
    if images not in IMAGE_MODES:
        raise DatasetConversionError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    if split not in SPLITS:
        raise DatasetConversionError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_num_processes(num_processes)
    dataset_folder_name(dataset_id, DATASET_NAME)  # checks the ID's range


def convert_stroke2021(source: str | Path, dataset_id: int, images: str = "png", split: str = "sdmcseg",
                       include_nonstroke: bool = False, swap_mask_colours: bool = False, strict: bool = False,
                       overwrite: bool = False, num_processes: int = DEFAULT_NUM_PROCESSES) -> Path:
    """Convert the Stroke2021 release in ``source`` to ``$nnUNet_raw/Dataset<ID>_Stroke2021``; returns that folder."""
    _check_options(dataset_id, images, split, num_processes)
    raw = nnunet_raw_folder()
    target = check_target_free(raw, dataset_id, dataset_folder_name(dataset_id, DATASET_NAME), overwrite)
    layout = detect_stroke2021_layout(source)
    collection = collect_slices(layout, images, include_nonstroke, strict)
    if not collection.slices:
        raise DatasetConversionError(f"no slices to convert in {layout.source}: the PNG folders hold no .png files")
    ischemia, hemorrhage = ((HEMORRHAGE_COLOUR, ISCHEMIA_COLOUR) if swap_mask_colours
                            else (ISCHEMIA_COLOUR, HEMORRHAGE_COLOUR))
    with staged_folder(target) as stage:
        pending = stage / ".slices"
        pending.mkdir()
        jobs = [SliceJob(item, images, pending, ischemia, hemorrhage, strict) for item in collection.slices]
        results = run_jobs(convert_slice, jobs, num_processes, DATASET_NAME, "slice", chunksize=4)
        kept: dict[str, list[str]] = {}
        for r in results:
            if not r.skip_reason:
                kept.setdefault(r.category, []).append(r.case_id)
        if not kept:
            raise DatasetConversionError(
                f"every slice in {layout.source} was skipped (no lesion drawn in any OVERLAY or MASK): "
                f"nothing to write")
        splits = split_by_category(kept, split)
        _move_into_place(stage, pending, splits, FILE_ENDING[images])
        num_training = sum(len(s.train) + len(s.val) for s in splits.values())
        _write_dataset_json(stage, layout, images, num_training, split, include_nonstroke)
        if split == "sdmcseg":
            _write_splits_file(stage, splits)
    report = ConversionReport(layout, target, images, split, include_nonstroke, collection, results, splits,
                              mask_colour_counts(results, layout))
    print(summary(report, ischemia, hemorrhage))
    return target


def convert_stroke2021_entry() -> None:
    parser = converter_parser(
        "nnDiffSeg_convert_stroke2021",
        "Convert the Stroke2021 brain CT release (TEKNOFEST 2021; competition, Ministry or SDMC-Seg layout) into an "
        "nnU-Net raw dataset $nnUNet_raw/Dataset<ID>_Stroke2021 with labels background 0, ischemic 1, "
        "hemorrhagic 2. See docs/stroke2021.md.",
        "folder holding the release: TRAINING/ (competition), the Ministry's unzipped folders, or SDMC-Seg's "
        "Training/")
    parser.add_argument("--images", choices=IMAGE_MODES, default="png",
                        help="png (default): the windowed PNG slices, one channel, z-scored by nnU-Net; dicom: the "
                             "DICOM in Hounsfield units as NIfTI (pixel spacing kept), with nnU-Net's CT normalisation")
    parser.add_argument("--split", choices=SPLITS, default="sdmcseg",
                        help="sdmcseg (default): SDMC-Seg's 80/10/10 %% per class with seed 0, test slices to "
                             "imagesTs/labelsTs and a one-fold splits_final.json; nnunet: all slices to imagesTr for "
                             "nnU-Net's own 5 folds. Either way splits are per slice and can leak patients")
    parser.add_argument("--include_nonstroke", action="store_true",
                        help="add the non-stroke slices with empty masks (SDMC-Seg trains on stroke slices only)")
    parser.add_argument("--swap_mask_colours", action="store_true",
                        help="read MASK blue (0,0,255) as hemorrhage and green (0,255,0) as ischemia")
    parser.add_argument("--strict", action="store_true",
                        help="stop at a stroke slice without a lesion or without its OVERLAY/MASK/DICOM file "
                             "instead of skipping and counting it")
    run_converter(parser, convert_stroke2021)


if __name__ == "__main__":
    convert_stroke2021_entry()
