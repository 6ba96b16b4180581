"""Synthetic dermoscopy-like images with lesion masks, written in the ISIC 2016 Part 1 release layout.

The pictures imitate what makes real dermoscopy segmentation non-trivial: skin of varying tone with
uneven lighting and vignetting, one pigmented lesion with an irregular, fuzzy border and uneven
pigment (dark blotches, lighter regression areas), faint lesions, dark hairs crossing everything
(never part of the mask) and occasional air bubbles / specular reflections. The mask is crisp.

Command line: ``python -m nndiffseg.demo.synthetic_dermoscopy OUT --num_train N --num_test M``.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from nndiffseg.errors import NnDiffSegError, run_cli

TRAIN_DATA = "ISBI2016_ISIC_Part1_Training_Data"
TRAIN_GT = "ISBI2016_ISIC_Part1_Training_GroundTruth"
TEST_DATA = "ISBI2016_ISIC_Part1_Test_Data"
TEST_GT = "ISBI2016_ISIC_Part1_Test_GroundTruth"

_PALE_SKIN = np.array([238.0, 208.0, 192.0])
_TAN_SKIN = np.array([196.0, 146.0, 116.0])
# Per-channel optical density of melanin: red is absorbed least, so more pigment reads as brown.
_MELANIN_ABSORPTION = np.array([0.70, 1.10, 1.45])
_REGRESSION_COLOUR = np.array([196.0, 190.0, 205.0])  # bluish-white/grey of regression structures


def _smooth_field(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """Random field with correlation length ~sigma pixels, scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma, mode="reflect")
    return field / (field.std() + 1e-12)


def _skin(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: float) -> np.ndarray:
    height, width = yy.shape
    tone = rng.uniform(0.0, 1.0) ** 1.5  # mostly light skin, as in the ISIC archive
    base = (1 - tone) * _PALE_SKIN + tone * _TAN_SKIN + rng.normal(0, 4, 3)
    skin = np.broadcast_to(base, (height, width, 3)).copy()

    # Blotchy redness: more red, less green/blue (clipped so that skin never turns greenish).
    redness = np.clip(_smooth_field(rng, height, width, scale * rng.uniform(0.08, 0.2)), -0.6, None)
    skin += redness[..., None] * (rng.uniform(2, 6) * np.array([0.5, -1.0, -0.7]))

    # Uneven illumination: a linear gradient plus a low-frequency brightness field.
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy) / scale
    shading = 1 + rng.uniform(0.0, 0.12) * gradient
    shading += rng.uniform(0.01, 0.05) * _smooth_field(rng, height, width, scale * 0.25)

    # Vignetting around a slightly off-centre optical axis; now and then the dark rim of the scope.
    cy = height / 2 + rng.normal(0, 0.05) * height
    cx = width / 2 + rng.normal(0, 0.05) * width
    r = np.hypot(yy - cy, xx - cx) / np.hypot(height / 2, width / 2)
    shading *= 1 - rng.uniform(0.05, 0.3) * r ** 2
    if rng.uniform() < 0.1:
        rim = rng.uniform(0.85, 1.0)
        shading *= 1 / (1 + np.exp((r - rim) * 40))
    skin *= shading[..., None]

    # Fine skin texture (furrows).
    skin += rng.uniform(2, 5) * ndimage.gaussian_filter(rng.standard_normal((height, width)), 0.8)[..., None]
    return skin


def _lesion_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                  height: int, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (normalised radius rho, border radius R at each pixel's angle, base radius in px).

    Pixels with rho < R are lesion. The border radius varies with angle by a few low harmonics
    (lobes, asymmetry) plus many small high harmonics (small-scale jitter)."""
    short = min(height, width)
    r0 = short * rng.uniform(0.12, 0.38)
    elongation = rng.uniform(1.0, 1.6)
    a, b = r0 * np.sqrt(elongation), r0 / np.sqrt(elongation)
    # Mostly central; now and then nearer an edge, where part of the lesion may leave the picture.
    spread = 0.2 if rng.uniform() < 0.8 else 0.35
    cy = height * rng.uniform(0.5 - spread, 0.5 + spread)
    cx = width * rng.uniform(0.5 - spread, 0.5 + spread)
    theta = rng.uniform(0, np.pi)

    dy, dx = yy - cy, xx - cx
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / a
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / b
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)

    harmonics = np.arange(2, 24)
    lobes = rng.uniform(0.06, 0.22) / harmonics
    jitter = rng.uniform(0.04, 0.14) / harmonics
    amplitude = np.where(harmonics <= 5, lobes, jitter)
    coef_cos = rng.normal(0, 1, harmonics.size) * amplitude
    coef_sin = rng.normal(0, 1, harmonics.size) * amplitude
    angles = harmonics[:, None, None] * phi[None]
    border = 1 + np.tensordot(coef_cos, np.cos(angles), 1) + np.tensordot(coef_sin, np.sin(angles), 1)
    return rho, np.maximum(border, 0.3), r0


def _lesion_pigment(rng: np.random.Generator, rho: np.ndarray, border: np.ndarray, r0: float,
                    scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (melanin density, regression weight) over the whole image."""
    height, width = rho.shape
    # Signed distance to the border in pixels (approximate: exact along the radial direction).
    inside_px = (border - rho) * r0
    fuzz = rng.uniform(0.8, 3.5) * scale / 128
    # Soft image border, centred on the crisp mask border and itself a little ragged.
    ragged = 0.25 * fuzz * _smooth_field(rng, height, width, max(scale * 0.02, 0.7))
    alpha = 1 / (1 + np.exp(-(inside_px + ragged) / (0.5 * fuzz)))

    # Contrast varies a lot: log-uniform base density, so some lesions are faint.
    base = np.exp(rng.uniform(np.log(0.12), np.log(1.0)))
    depth = np.clip(1 - rho / border, 0, 1)  # 0 at the border, 1 at the centre
    core = base * rng.uniform(0.2, 1.3) * depth ** rng.uniform(0.5, 2.0)
    blotches = np.clip(_smooth_field(rng, height, width, r0 * rng.uniform(0.15, 0.35)) - 0.5, 0, None)
    melanin = base + core + base * rng.uniform(0.2, 1.0) * blotches
    melanin *= 1 + 0.1 * rng.standard_normal((height, width))  # granular pigment network

    regression = np.zeros((height, width))
    if rng.uniform() < 0.45:
        areas = np.clip(_smooth_field(rng, height, width, r0 * rng.uniform(0.2, 0.4)) - rng.uniform(0.6, 1.2), 0, 1)
        regression = rng.uniform(0.25, 0.55) * np.clip(areas * 1.5, 0, 1) * alpha
        melanin *= 1 - regression
    return melanin * alpha, regression


def _hairs(rng: np.random.Generator, image: np.ndarray, lesion_centre: tuple[float, float], scale: float) -> None:
    """Paint dark thin curved strokes (quadratic Bezier curves) onto ``image`` in place."""
    height, width = image.shape[:2]
    n_hairs = 0 if rng.uniform() < 0.3 else int(rng.integers(1, 8))
    t = np.linspace(0, 1, 2 * int(height + width))[:, None]
    pixels = np.stack(np.mgrid[0:height, 0:width], axis=-1).reshape(-1, 2).astype(np.float64)
    for _ in range(n_hairs):
        # Half of the hairs pass near the lesion, the rest anywhere.
        if rng.uniform() < 0.5:
            mid = np.array(lesion_centre) + rng.normal(0, 0.15 * scale, 2)
        else:
            mid = rng.uniform([0, 0], [height, width])
        direction = rng.uniform(0, 2 * np.pi)
        half_length = scale * rng.uniform(0.2, 0.8)
        along = np.array([np.sin(direction), np.cos(direction)])
        across = np.array([np.cos(direction), -np.sin(direction)])
        bend = rng.normal(0, 0.5) * half_length * across
        curve = (1 - t) ** 2 * (mid - half_length * along) + 2 * (1 - t) * t * (mid + bend) \
            + t ** 2 * (mid + half_length * along)
        hair_width = rng.uniform(0.5, 2.0) * scale / 128
        # Exact distance of every pixel centre to the sampled centre line gives anti-aliased strokes.
        reach = hair_width / 2 + 1
        distance, _ = cKDTree(curve).query(pixels, distance_upper_bound=reach)
        distance = np.minimum(distance, reach).reshape(height, width)
        coverage = np.clip(hair_width / 2 + 0.5 - distance, 0, 1) * min(hair_width, 1.0)
        coverage *= rng.uniform(0.6, 0.9)
        colour = rng.uniform(20, 70) * np.array([1.0, 0.85, 0.75])
        image *= 1 - coverage[..., None]
        image += coverage[..., None] * colour


def _bubbles(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray, scale: float) -> None:
    """Occasionally paint a few light circular air bubbles with a specular spot onto ``image`` in place."""
    if rng.uniform() >= 0.25:
        return
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(1, 5))):
        radius = rng.uniform(0.02, 0.1) * scale
        cy, cx = rng.uniform([0, 0], [height, width])
        d = np.hypot(yy - cy, xx - cx)
        rim = 0.55 * np.exp(-(((d - radius) / 0.8) ** 2))
        interior = 0.12 * (d < radius)
        spot = 0.9 * np.exp(-((np.hypot(yy - cy + 0.4 * radius, xx - cx + 0.4 * radius) / (0.25 * radius + 0.5)) ** 2))
        light = np.clip(rim + interior + spot, 0, 1)[..., None]
        image *= 1 - light
        image += light * 250


def make_case(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy-like picture: (RGB uint8 image of shape (height, width, 3), bool mask).

    Deterministic for a given ``rng`` state (the generator is advanced)."""
    if height < 8 or width < 8:
        raise NnDiffSegError(f"synthetic images must be at least 8x8 pixels, got {height}x{width}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    scale = float(min(height, width))

    skin = _skin(rng, yy, xx, scale)
    rho, border, r0 = _lesion_shape(rng, yy, xx, height, width)
    mask = rho < border
    melanin, regression = _lesion_pigment(rng, rho, border, r0, scale)

    image = skin * np.exp(-melanin[..., None] * _MELANIN_ABSORPTION)
    image += regression[..., None] * (_REGRESSION_COLOUR * skin.mean(axis=(0, 1)) / _PALE_SKIN - image)

    if mask.any():
        rows, cols = np.nonzero(mask)
        centre = (rows.mean(), cols.mean())
    else:
        centre = (height / 2, width / 2)
    _hairs(rng, image, centre, scale)
    _bubbles(rng, image, yy, xx, scale)
    image += rng.normal(0, rng.uniform(1, 3), image.shape)  # sensor noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def write_isic2016_layout(out_dir: str | Path, num_train: int, num_test: int, height: int = 96, width: int = 128,
                          seed: int = 0) -> Path:
    """Write ``num_train`` + ``num_test`` synthetic cases in the ISIC 2016 Part 1 release layout.

    ``ISBI2016_ISIC_Part1_{Training,Test}_Data/ISIC_<7-digit id>.jpg`` (JPEG quality 95) and
    ``ISBI2016_ISIC_Part1_{Training,Test}_GroundTruth/ISIC_<id>_Segmentation.png`` (8-bit, 0/255);
    ids run from ISIC_0000000, training cases first. Case ``i`` depends only on (seed, i), so the
    same arguments give byte-identical files. Existing files of the same names are overwritten;
    other files in ``out_dir`` are left alone. Returns ``out_dir``."""
    if num_train < 0 or num_test < 0:
        raise NnDiffSegError(f"case counts must not be negative, got num_train={num_train}, num_test={num_test}")
    out_dir = Path(out_dir)
    splits = [(TRAIN_DATA, TRAIN_GT, range(num_train)), (TEST_DATA, TEST_GT, range(num_train, num_train + num_test))]
    for data_name, gt_name, ids in splits:
        data_dir, gt_dir = out_dir / data_name, out_dir / gt_name
        data_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for case_id in ids:
            rng = np.random.default_rng([seed, case_id])
            image, mask = make_case(rng, height, width)
            name = f"ISIC_{case_id:07d}"
            Image.fromarray(image, mode="RGB").save(data_dir / f"{name}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt_dir / f"{name}_Segmentation.png")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write synthetic dermoscopy-like images and lesion masks in the ISIC 2016 Part 1 layout.")
    parser.add_argument("out_dir", help="folder to write the ISBI2016_ISIC_Part1_* folders into")
    parser.add_argument("--num_train", type=int, default=60, help="number of training cases (default 60)")
    parser.add_argument("--num_test", type=int, default=20, help="number of test cases (default 20)")
    parser.add_argument("--height", type=int, default=96, help="image height in pixels (default 96)")
    parser.add_argument("--width", type=int, default=128, help="image width in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        raise NnDiffSegError(f"--seed must not be negative, got {args.seed}")
    out = write_isic2016_layout(args.out_dir, args.num_train, args.num_test, args.height, args.width, args.seed)
    print(f"Wrote {args.num_train} training and {args.num_test} test cases to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
