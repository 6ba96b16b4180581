"""Synthetic stand-in for the Stroke2021 (TEKNOFEST 2021) brain CT release, written in any of its three layouts.

No copy of the release's CT slices can be had for tests, so this writes slices that look and are stored like
the release's (``../shared/data/README.md`` gathers what is known of it):

- DICOM: the slice in Hounsfield units, stored with a real rescale (stored value = HU + 1024, RescaleIntercept
  -1024, RescaleSlope 1), modality CT, pixel spacing as a head CT's.
- PNG: the same slice in the brain window (level 40 HU, width 80 HU), 8 bits, grey in RGB (or L).
- OVERLAY: 32-bit RGBA, the PNG with the lesion filled semi-transparent red and outlined in the mask colour.
- MASK (competition layout only): 24-bit RGB, ischemia (0, 0, 255), hemorrhage (0, 255, 0), elsewhere black.

The slices are CT-like: air, a bright skull ring, brain with a brighter cortical rim and dark ventricles,
scanner noise, and per stroke slice one irregular lesion: hypo-dense (ischemic, ~18 HU against ~33 HU brain)
or hyper-dense (hemorrhagic, ~70 HU). The outline is drawn on the lesion's own border pixels, so the pixels
where OVERLAY differs from PNG are exactly the lesion, and every layout has the same ground truth.

Python: ``write_stroke2021_fixture(out, layout=...)`` returns the ground truth of every slice.
Command line: ``python -m nndiffseg.dataset_conversion.stroke2021_fixture OUT --layout ministry --truth TRUTH``.
"""
from __future__ import annotations

import argparse
import json
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nndiffseg.dataset_conversion.common import save_png
from nndiffseg.dataset_conversion.stroke2021 import CATEGORIES, CATEGORY_LABEL, HEMORRHAGE_COLOUR, ISCHEMIA_COLOUR
from nndiffseg.errors import NnDiffSegError, run_cli

LAYOUTS = ("competition", "ministry", "sdmcseg")
BRAIN_WINDOW = (40.0, 80.0)  # level, width (HU)
RESCALE_INTERCEPT = -1024
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2\x00"  # the transfer syntax GDCM writes write_dicom's files in
OVERLAY_RED_ALPHA = 0.4
I_STYLES = ("release", "dotless", "upper", "ascii")

# Folder names per layout: category -> path of the category's folder (relative to the fixture root), and the
# subfolders it holds. The Ministry's non-stroke slices come as two separate folders (PNG and DICOM).
COMPETITION_FOLDERS = {"ischemic": "TRAINING/ISKEMI", "hemorrhagic": "TRAINING/KANAMA",
                       "nonstroke": "TRAINING/INMEYOK"}
SDMCSEG_FOLDERS = {"ischemic": "Training/Ischemic", "hemorrhagic": "Training/Hemorrhagic",
                   "nonstroke": "Training/Non-Stroke"}
MINISTRY_FOLDERS = {"ischemic": "Eğitim Veri Seti_İskemi/İskemi Veri Seti",
                    "hemorrhagic": "Eğitim Veri Seti_Kanama/Kanama Veri Seti"}
MINISTRY_NONSTROKE_PNG = "İnme Yok_kronik süreç_diğer Veri Set_PNG"
MINISTRY_NONSTROKE_DICOM = "İnme Yok_kronik süreç_diğer Veri Set_DICOM"  # by analogy: the name is not documented


@dataclass(frozen=True)
class SyntheticSlice:
    case_id: str
    category: str  # "ischemic", "hemorrhagic" or "nonstroke"
    hu: np.ndarray  # int16, Hounsfield units (what the DICOM decodes to)
    png: np.ndarray  # uint8, brain-windowed (what the PNG holds, in every channel)
    label: np.ndarray  # uint8: 0 background, 1 ischemic, 2 hemorrhagic
    spacing: tuple[float, float]  # (x, y) in mm, as SimpleITK reports it


@dataclass(frozen=True)
class Stroke2021Fixture:
    source: Path  # the folder to convert
    layout: str
    slices: dict[str, SyntheticSlice]
    files: dict[str, dict[str, Path]] = field(repr=False)  # case id -> {"png", "overlay", "mask", "dicom"} -> file

    def ids(self, category: str) -> list[str]:
        return sorted(c for c, s in self.slices.items() if s.category == category)


# ---------------------------------------------------------------------------------------------- pixels

def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="reflect")
    return noise / (noise.std() + 1e-12)


def _lesion_region(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """An irregular blob well inside the brain, at least 8 pixels."""
    size = x.shape[0]
    inner = ndimage.binary_erosion(brain, iterations=max(2, size // 20))
    for _ in range(100):
        cx, cy = rng.uniform(-0.45, 0.45, 2)
        radius = rng.uniform(0.12, 0.25)
        distance = np.hypot(x - cx, (y - cy) * rng.uniform(0.7, 1.3)) / radius
        region = (distance + 0.35 * _smooth_noise(rng, size, size / 16)) < 1
        region &= inner
        region = ndimage.binary_opening(region)
        if region.sum() >= 8:
            labelled, count = ndimage.label(region)
            largest = 1 + int(np.argmax(ndimage.sum(region, labelled, range(1, count + 1))))
            return labelled == largest
    raise RuntimeError("could not place a lesion inside the brain; use a larger slice size")


def synthesize_slice(rng: np.random.Generator, size: int, category: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU as int16, lesion as bool) of one CT-like axial head slice of ``size`` x ``size`` pixels."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = rng.normal(0, 0.03, 2)
    angle = rng.uniform(-0.15, 0.15)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    r = np.hypot(u / rng.uniform(0.70, 0.80), v / rng.uniform(0.82, 0.92))
    skull_thickness = max(0.08, 2.5 / size * 2)
    head, brain = r < 1, r < 1 - skull_thickness

    hu = np.full((size, size), -1000.0)
    hu[head & ~brain] = rng.uniform(900, 1400) + 150 * _smooth_noise(rng, size, size / 10)[head & ~brain]
    brain_hu = 30 + 3 * _smooth_noise(rng, size, size / 12)
    brain_hu[r > 1 - skull_thickness - 0.1] += 8  # grey matter of the cortex is denser than white matter
    if rng.uniform() < 0.8:  # lateral ventricles
        for side in (-1, 1):
            ventricle = np.hypot((u - side * 0.12) / 0.07, (v + 0.05) / 0.22) < 1
            brain_hu[ventricle] = 8
    hu[brain] = brain_hu[brain]

    lesion = np.zeros((size, size), bool)
    if category != "nonstroke":
        lesion = _lesion_region(rng, x, y, brain)
        hu[lesion] = 18 if category == "ischemic" else rng.uniform(62, 78)
    hu += rng.normal(0, 3, hu.shape)  # scanner noise
    return np.clip(np.round(hu), RESCALE_INTERCEPT, 3071).astype(np.int16), lesion


def window(hu: np.ndarray, level: float = BRAIN_WINDOW[0], width: float = BRAIN_WINDOW[1]) -> np.ndarray:
    """8-bit display values of ``hu`` in the window (level, width), as the release's PNG slices hold them."""
    scaled = (hu.astype(np.float64) - (level - width / 2)) / width * 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def overlay_rgba(png: np.ndarray, lesion: np.ndarray, outline_colour: tuple[int, int, int]) -> np.ndarray:
    """The slice in RGBA with the lesion filled semi-transparent red and its border pixels in the mask colour."""
    rgb = np.repeat(png[..., None], 3, axis=-1).astype(np.float64)
    rgb[lesion] = (1 - OVERLAY_RED_ALPHA) * rgb[lesion] + OVERLAY_RED_ALPHA * np.array([255.0, 0, 0])
    rgb = np.round(rgb).astype(np.uint8)
    border = lesion & ~ndimage.binary_erosion(lesion)
    rgb[border] = outline_colour
    return np.concatenate([rgb, np.full(png.shape + (1,), 255, np.uint8)], axis=-1)


def mask_rgb(lesion: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgb = np.zeros(lesion.shape + (3,), np.uint8)
    rgb[lesion] = colour
    return rgb


# ---------------------------------------------------------------------------------------------- files

def write_dicom(path: Path, hu: np.ndarray, spacing: tuple[float, float], instance: str) -> None:
    """A CT DICOM of ``hu``: GDCM stores ``hu - RescaleIntercept`` (so 0..4095 for -1024..3071 HU) and writes
    the rescale tags; readers applying them get ``hu`` back."""
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    for tag, value in {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                       "0028|1052": str(RESCALE_INTERCEPT), "0028|1053": "1", "0028|1054": "HU",
                       "0028|1050": str(int(BRAIN_WINDOW[0])), "0028|1051": str(int(BRAIN_WINDOW[1])),
                       "0020|0013": instance}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(path))
    writer.Execute(image)


def edit_dicom_element(path: Path, group: int, element: int, value: bytes | None) -> None:
    """Replace the value of one element of a file write_dicom wrote, or remove the element (``value`` None): the
    anomalies of real slices, which GDCM will not write (no RescaleSlope/Intercept, a corrupt slope)."""
    data = path.read_bytes()
    position = 144 + struct.unpack_from("<I", data, 140)[0]  # preamble, b"DICM", then the meta group's length
    if IMPLICIT_VR_LITTLE_ENDIAN not in data[132:position]:
        raise NnDiffSegError(f"{path} is not in implicit VR little endian: cannot edit it")
    while position < len(data):
        found_group, found_element, length = struct.unpack_from("<HHI", data, position)
        if (found_group, found_element) == (group, element):
            if value is not None:
                value += b" " * (len(value) % 2)  # DICOM values have even lengths
            new = b"" if value is None else struct.pack("<HHI", group, element, len(value)) + value
            path.write_bytes(data[:position] + new + data[position + 8 + length:])
            return
        position += 8 + length
    raise NnDiffSegError(f"{path} has no element ({group:04x},{element:04x})")


def styled_name(name: str, i_style: str, normalization: str) -> str:
    """A Turkish folder name as an unzip tool or a user may have spelled it: ``i_style`` 'release' (as
    released), 'dotless' (İ->I, i->ı), 'upper' (Turkish capitals) or 'ascii' (no diacritics); then in Unicode
    normal form ``normalization`` (NFC or NFD)."""
    if i_style == "dotless":
        name = name.replace("İ", "I").replace("i", "ı")
    elif i_style == "upper":
        name = name.replace("i", "İ").replace("ı", "I").upper()
    elif i_style == "ascii":
        decomposed = unicodedata.normalize("NFKD", name.replace("ı", "i"))
        name = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    elif i_style != "release":
        raise NnDiffSegError(f"unknown i style {i_style!r}; choose one of {', '.join(I_STYLES)}")
    if normalization not in ("NFC", "NFD"):
        raise NnDiffSegError(f"unknown normalization {normalization!r}; choose NFC or NFD")
    return unicodedata.normalize(normalization, name)


def _styled_path(relative: str, i_style: str, normalization: str) -> Path:
    return Path(*(styled_name(part, i_style, normalization) for part in Path(relative).parts))


def _category_folders(layout: str, i_style: str, normalization: str) -> dict[str, dict[str, Path]]:
    """category -> subfolder kind ('png', 'overlay', 'mask', 'dicom') -> folder relative to the root."""
    if layout in ("competition", "sdmcseg"):
        lesion_kinds = ("overlay", "mask") if layout == "competition" else ("overlay",)
        return {category: {kind: Path(base) / kind.upper()
                           for kind in ("png", "dicom") + (() if category == "nonstroke" else lesion_kinds)}
                for category, base in (COMPETITION_FOLDERS if layout == "competition" else SDMCSEG_FOLDERS).items()}
    if layout == "ministry":
        folders = {category: {kind: _styled_path(base, i_style, normalization) / kind.upper()
                              for kind in ("png", "overlay", "dicom")}
                   for category, base in MINISTRY_FOLDERS.items()}
        folders["nonstroke"] = {"png": _styled_path(MINISTRY_NONSTROKE_PNG, i_style, normalization),
                                "dicom": _styled_path(MINISTRY_NONSTROKE_DICOM, i_style, normalization)}
        return folders
    raise NnDiffSegError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _slice_categories(rng: np.random.Generator, counts: dict[str, int], first_id: int) -> dict[str, str]:
    """case id -> category; the ids are consecutive and shuffled across categories, as in the release."""
    categories = [c for c in CATEGORIES for _ in range(counts[c])]
    rng.shuffle(categories)
    return {str(first_id + i): category for i, category in enumerate(categories)}


def write_stroke2021_fixture(out: str | Path, layout: str = "competition", num_ischemic: int = 3,
                             num_hemorrhagic: int = 3, num_nonstroke: int = 2, size: int = 64, seed: int = 0,
                             normalization: str = "NFC", i_style: str = "release", png_mode: str = "RGB",
                             swap_mask_colours: bool = False, first_id: int = 10000) -> Stroke2021Fixture:
    """Write a synthetic release into ``out`` (which must not exist yet) in ``layout``; returns the ground truth.

    ``normalization`` and ``i_style`` spell the Ministry layout's Turkish folder names (see styled_name);
    ``png_mode`` is 'RGB' (grey in three channels) or 'L'; ``swap_mask_colours`` paints the MASK images the
    other way round (ischemia green, hemorrhage blue)."""
    out = Path(out)
    if out.exists():
        raise NnDiffSegError(f"{out} already exists; the fixture is written into a new folder")
    if size < 32:
        raise NnDiffSegError(f"size must be at least 32 pixels, got {size}")
    if png_mode not in ("RGB", "L"):
        raise NnDiffSegError(f"png_mode must be RGB or L, got {png_mode!r}")
    folders = _category_folders(layout, i_style, normalization)
    rng = np.random.default_rng(seed)
    counts = {"ischemic": num_ischemic, "hemorrhagic": num_hemorrhagic, "nonstroke": num_nonstroke}
    colours = {"ischemic": ISCHEMIA_COLOUR, "hemorrhagic": HEMORRHAGE_COLOUR}
    if swap_mask_colours:
        colours = {"ischemic": HEMORRHAGE_COLOUR, "hemorrhagic": ISCHEMIA_COLOUR}
    for kinds in folders.values():
        for folder in kinds.values():
            (out / folder).mkdir(parents=True, exist_ok=True)

    slices, files = {}, {}
    for case_id, category in _slice_categories(rng, counts, first_id).items():
        hu, lesion = synthesize_slice(rng, size, category)
        png = window(hu)
        pixel = round(float(rng.uniform(0.40, 0.50)) * 512 / size, 4)  # a 512 px slice covers 20-26 cm
        spacing = (pixel, pixel)
        label = (lesion * CATEGORY_LABEL[category]).astype(np.uint8)
        slices[case_id] = SyntheticSlice(case_id, category, hu, png, label, spacing)
        paths = {kind: out / folder / f"{case_id}.{'dcm' if kind == 'dicom' else 'png'}"
                 for kind, folder in folders[category].items()}
        files[case_id] = paths
        save_png(png if png_mode == "L" else np.repeat(png[..., None], 3, axis=-1), paths["png"])
        write_dicom(paths["dicom"], hu, spacing, case_id)
        if "overlay" in paths:
            save_png(overlay_rgba(png, lesion, colours[category]), paths["overlay"])
        if "mask" in paths:
            save_png(mask_rgb(lesion, colours[category]), paths["mask"])
    return Stroke2021Fixture(out, layout, slices, files)


def write_truth(fixture: Stroke2021Fixture, folder: str | Path) -> None:
    """The ground truth as label PNGs (0/1/2) plus slices.json (id -> category, spacing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for case_id, item in fixture.slices.items():
        save_png(item.label, folder / f"{case_id}.png")
    meta = {c: {"category": s.category, "spacing": list(s.spacing)} for c, s in sorted(fixture.slices.items())}
    (folder / "slices.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nndiffseg.dataset_conversion.stroke2021_fixture",
        description="Write a synthetic Stroke2021 (TEKNOFEST 2021 brain CT) release in one of its three layouts: "
                    "CT-like slices as DICOM (HU with a real rescale), brain-windowed PNG, RGBA OVERLAY and "
                    "(competition layout) RGB MASK.")
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--layout", choices=LAYOUTS, default="competition")
    parser.add_argument("--num_ischemic", type=int, default=10)
    parser.add_argument("--num_hemorrhagic", type=int, default=10)
    parser.add_argument("--num_nonstroke", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="slice edge in pixels (the release's is 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalization", choices=("NFC", "NFD"), default="NFC",
                        help="Unicode form of the Ministry layout's Turkish folder names")
    parser.add_argument("--i_style", choices=I_STYLES, default="release",
                        help="spelling of the Turkish folder names' i: as released, dotless, upper case or ASCII")
    parser.add_argument("--png_mode", choices=("RGB", "L"), default="RGB")
    parser.add_argument("--swap_mask_colours", action="store_true",
                        help="paint MASK images the other way round (ischemia green, hemorrhage blue)")
    parser.add_argument("--truth", type=Path, default=None,
                        help="also write the ground-truth label PNGs (0/1/2) and slices.json into this folder")
    args = parser.parse_args(argv)
    fixture = write_stroke2021_fixture(
        args.out, args.layout, args.num_ischemic, args.num_hemorrhagic, args.num_nonstroke, args.size, args.seed,
        args.normalization, args.i_style, args.png_mode, args.swap_mask_colours)
    if args.truth is not None:
        write_truth(fixture, args.truth)
    counts = ", ".join(f"{len(fixture.ids(c))} {c}" for c in CATEGORIES)
    print(f"wrote a synthetic Stroke2021 release ({args.layout} layout, {counts}) to {fixture.source}")
    return 0


if __name__ == "__main__":
    run_cli(main)
