"""A synthetic multi-rater release whose raters disagree in a known way, in QUBIQ's layout or the LIDC crops' one
(both read by nnDiffSeg_convert_multirater).

Every case shows a clear blob (high contrast) that every rater marks. On a known fraction of the cases a second,
fainter blob (low contrast) appears that exactly ``faint_raters`` of the ``num_raters`` raters mark (2 of 4 by
default, so its rater fraction is 0.5); which raters mark it varies from case to case (the combinations in turn).
On top, rater-specific border jitter: rater 2, 5, ... dilate their masks by one pixel, raters 3, 6, ... erode them
by one pixel (a cross-shaped structuring element), the others draw the blob exactly; so the strict majority of
the clear blob is the blob itself, and a faint blob marked by exactly half of the raters is a tie (background).
The returned ground truth says which cases hold the faint blob, its mask and the rater fraction: a model that
learned the raters' distribution should draw the faint blob in about that fraction of its samples.

QUBIQ layout: ``OUT/{Training,Validation}/caseNN/image.nii.gz`` with ``task01_seg01.nii.gz ...`` (``OUT`` is the
task folder; validation cases are numbered from case01 again, as names the converter must tell apart);
``num_tasks=2`` adds ``task02_`` masks of a sub-structure (the clear blob's core); ``depth_one`` stores every
image and mask as an (x, y, 1) volume; ``channels`` > 1 stores the image as (x, y, channels), as QUBIQ's brain
tumour does with its MR sequences. LIDC layout: ``OUT/{training,testing}/<n>/image_<n+1>.jpg`` with
``label0_.jpg ...`` as 8-bit grey JPEGs (masks 0/255 with compression noise).

Command line: ``python -m nndiffseg.demo.synthetic_multirater OUT --num_train N --num_test M [--layout lidc]``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from nndiffseg.errors import NnDiffSegError, run_cli

LAYOUTS = ("qubiq", "lidc")
SPLITS = {"qubiq": ("Training", "Validation"), "lidc": ("training", "testing")}
SPACING = (0.8, 0.7, 3.0)  # of depth-one volumes; 2D images get the first two
ORIGIN = (12.5, -4.0, 30.0)
CORE_EROSION = 3  # task 2: the clear blob eroded by this many pixels
JPEG_QUALITY = 95
FAINT_CONTRAST = 0.12  # low contrast: about three times the pixel noise (the clear blob's is 0.5)


@dataclass
class MultiraterCase:
    name: str  # the case folder's name
    split: str  # the split folder's name
    image: np.ndarray  # (channels, y, x); float32 (QUBIQ) or uint8 (LIDC)
    clear: np.ndarray  # bool (y, x): the clear blob, marked by every rater
    faint: np.ndarray | None  # bool (y, x): the faint blob, None where the case has none
    faint_raters: tuple[int, ...]  # the raters (0-based) who mark the faint blob
    raters: list[np.ndarray]  # bool (y, x) per rater as written (task 1)
    task2_raters: list[np.ndarray] | None = None  # bool (y, x) per rater (task 2), where written


@dataclass
class MultiraterFixture:
    source: Path  # what to pass as -i: the QUBIQ task folder or the LIDC folder
    layout: str
    num_raters: int
    faint_raters: int  # how many raters mark a faint blob
    cases: list[MultiraterCase]

    @property
    def rater_fraction(self) -> float:
        """The fraction of raters marking the faint blob where there is one."""
        return self.faint_raters / self.num_raters

    def faint_cases(self) -> list[MultiraterCase]:
        return [c for c in self.cases if c.faint is not None]


def jitter(mask: np.ndarray, rater: int) -> np.ndarray:
    """Rater ``rater``'s (0-based) drawing of ``mask``: exact, dilated or eroded by one pixel, by ``rater % 3``."""
    if rater % 3 == 1:
        return ndimage.binary_dilation(mask)
    if rater % 3 == 2:
        return ndimage.binary_erosion(mask)
    return mask.copy()


def _disk(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _blobs(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The clear blob in the left half and a possible faint one in the right half, apart by several pixels."""
    clear = _disk(size, (rng.uniform(0.3, 0.7) * size, rng.uniform(0.2, 0.3) * size), rng.uniform(0.12, 0.16) * size)
    faint = _disk(size, (rng.uniform(0.3, 0.7) * size, rng.uniform(0.7, 0.8) * size), rng.uniform(0.08, 0.11) * size)
    return clear, faint


def _image(rng: np.random.Generator, clear: np.ndarray, faint: np.ndarray | None, channels: int,
           layout: str, faint_contrast: float = FAINT_CONTRAST) -> np.ndarray:
    size = clear.shape[0]
    background = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 8)
    base = 0.3 + 0.05 * background / (background.std() + 1e-12) + 0.5 * clear
    if faint is not None:
        base = base + faint_contrast * faint
    stack = np.stack([base * (1 + 0.25 * c) + rng.normal(0, 0.04, base.shape) for c in range(channels)])
    if layout == "lidc":
        return np.clip(stack * 255, 0, 255).round().astype(np.uint8)
    return (stack * 1000).astype(np.float32)  # MR-like intensities


def _write_nifti(values: np.ndarray, path: Path, depth_one: bool) -> None:
    """``values`` (y, x) or (channels, y, x) as a 2D image, an (x, y, channels) or, with ``depth_one``, an (x, y, 1)
    volume."""
    image = sitk.GetImageFromArray(values[None] if depth_one and values.ndim == 2 else values)
    image.SetSpacing(SPACING[:image.GetDimension()])
    image.SetOrigin(ORIGIN[:image.GetDimension()])
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_case(case: MultiraterCase, folder: Path, layout: str, depth_one: bool, number: int) -> None:
    folder.mkdir(parents=True)
    if layout == "lidc":
        Image.fromarray(case.image[0]).save(folder / f"image_{number + 1}.jpg", quality=JPEG_QUALITY)
        for r, mask in enumerate(case.raters):
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"label{r}_.jpg", quality=JPEG_QUALITY)
        return
    _write_nifti(case.image[0] if len(case.image) == 1 else case.image, folder / "image.nii.gz", depth_one)
    for task, masks in ((1, case.raters), (2, case.task2_raters)):
        for r, mask in enumerate(masks or (), 1):
            _write_nifti(mask.astype(np.uint8), folder / f"task{task:02d}_seg{r:02d}.nii.gz", depth_one)


def write_multirater_fixture(out: str | Path, num_train: int, num_test: int, size: int = 64, num_raters: int = 4,
                             seed: int = 0, layout: str = "qubiq", faint_raters: int | None = None,
                             faint_fraction: float = 0.5, num_tasks: int = 1, depth_one: bool = False,
                             channels: int = 1, faint_contrast: float = FAINT_CONTRAST) -> MultiraterFixture:
    """Write the release into ``out`` (which must not exist) and return its ground truth. ``faint_raters``
    defaults to half of the raters (rounded down); ``round(faint_fraction * cases)`` cases, drawn at random,
    hold a faint blob, ``faint_contrast`` brighter than the background (the raters' disagreement is the same at
    any contrast; a higher one makes the blob easier to see at a small size)."""
    out = Path(out)
    faint_raters = num_raters // 2 if faint_raters is None else faint_raters
    if layout not in LAYOUTS:
        raise NnDiffSegError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 1 <= faint_raters <= num_raters or num_train < 0 or num_test < 0 or size < 24:
        raise NnDiffSegError("need 1 <= faint_raters <= num_raters, case counts >= 0 and size >= 24")
    if layout == "lidc" and (num_tasks != 1 or depth_one or channels != 1):
        raise NnDiffSegError("the LIDC layout has one task, 2D grey images and one channel")
    if out.exists():
        raise NnDiffSegError(f"{out} already exists; choose a new folder")
    rng = np.random.default_rng(seed)
    total = num_train + num_test
    with_faint = set(rng.permutation(total)[:round(faint_fraction * total)].tolist())
    patterns = list(combinations(range(num_raters), faint_raters))
    cases, faint_seen = [], 0
    for i in range(total):
        clear, faint = _blobs(rng, size)
        marked: tuple[int, ...] = ()
        if i in with_faint:
            marked, faint_seen = patterns[faint_seen % len(patterns)], faint_seen + 1
        else:
            faint = None
        raters = [jitter(clear | (faint if r in marked else False), r) for r in range(num_raters)]
        core = ndimage.binary_erosion(clear, iterations=CORE_EROSION)
        train = i < num_train
        number = i if train or layout == "lidc" else i - num_train  # QUBIQ numbers its validation cases anew
        case = MultiraterCase(
            f"case{number + 1:02d}" if layout == "qubiq" else str(number), SPLITS[layout][0 if train else 1],
            _image(rng, clear, faint, channels, layout, faint_contrast), clear, faint, marked, raters,
            [jitter(core, r) for r in range(num_raters)] if num_tasks > 1 else None)
        _write_case(case, out / case.split / case.name, layout, depth_one, number)
        cases.append(case)
    return MultiraterFixture(out, layout, num_raters, faint_raters, cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nndiffseg.demo.synthetic_multirater",
        description="Write a synthetic multi-rater release (QUBIQ or LIDC layout): a clear blob every rater marks and, "
                    "on some cases, a faint blob that exactly K of the R raters mark, plus per-rater border jitter.")
    parser.add_argument("out", type=Path, help="folder to create (must not exist); the QUBIQ task folder")
    parser.add_argument("--num_train", type=int, default=20)
    parser.add_argument("--num_test", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image edge in pixels")
    parser.add_argument("--num_raters", type=int, default=4)
    parser.add_argument("--faint_raters", type=int, default=None, help="raters marking the faint blob (default R/2)")
    parser.add_argument("--faint_fraction", type=float, default=0.5, help="fraction of cases with a faint blob")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="qubiq")
    parser.add_argument("--num_tasks", type=int, choices=(1, 2), default=1, help="QUBIQ: 2 adds task02_ masks")
    parser.add_argument("--depth_one", action="store_true", help="QUBIQ: store slices as (x, y, 1) volumes")
    parser.add_argument("--channels", type=int, default=1, help="QUBIQ: image channels, stored as (x, y, C)")
    args = parser.parse_args(argv)
    fixture = write_multirater_fixture(args.out, args.num_train, args.num_test, args.size, args.num_raters, args.seed,
                                       args.layout, args.faint_raters, args.faint_fraction, args.num_tasks,
                                       args.depth_one, args.channels)
    print(f"wrote a synthetic multi-rater release ({args.layout} layout, {len(fixture.cases)} cases, "
          f"{len(fixture.faint_cases())} with a faint blob marked by {fixture.faint_raters} of {fixture.num_raters} "
          f"raters) to {fixture.source}")
    return 0


if __name__ == "__main__":
    run_cli(main)
