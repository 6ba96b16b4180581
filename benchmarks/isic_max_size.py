"""How much lesion-mask accuracy does nnDiffSeg_convert_isic's --max_size cost?

For every mask of an ISIC folder, shrink it to each max_size (nearest neighbour, as the converter does),
scale it back to the original size (nearest) and report the mean Dice with the original. The loss is what
resolution alone costs: a model trained at that size cannot score higher on the original masks.

    python benchmarks/isic_max_size.py [MASK_FOLDER] [--sizes 256 384 512 768]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nndiffseg.dataset_conversion.isic import shrunk_size

DEFAULT_MASKS = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2017_sample"
                 / "ISIC-2017_Training_Part1_GroundTruth")


def round_trip_dice(mask: Image.Image, max_size: int) -> float:
    small = mask.resize(shrunk_size(mask.size, max_size), Image.Resampling.NEAREST)
    back = np.asarray(small.resize(mask.size, Image.Resampling.NEAREST)) > 127
    orig = np.asarray(mask) > 127
    denominator = orig.sum() + back.sum()
    return 1.0 if denominator == 0 else 2.0 * np.logical_and(orig, back).sum() / denominator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("masks", nargs="?", type=Path, default=DEFAULT_MASKS,
                        help="folder of ISIC *_segmentation.png masks (default: the shared ISIC 2017 sample)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512, 768])
    args = parser.parse_args(argv)
    files = sorted(p for p in args.masks.iterdir() if p.name.lower().endswith("_segmentation.png"))
    if not files:
        print(f"no *_segmentation.png masks in {args.masks}", file=sys.stderr)
        return 1
    masks = [Image.open(p).convert("L") for p in files]
    print(f"{len(masks)} masks from {args.masks}; longest sides {min(max(m.size) for m in masks)}-"
          f"{max(max(m.size) for m in masks)} px")
    print(f"{'max_size':>8} | {'mean Dice':>9} | {'min Dice':>8} | {'mean loss (Dice points)':>23}")
    for size in args.sizes:
        dice = np.array([round_trip_dice(m, size) for m in masks])
        print(f"{size:>8} | {dice.mean():9.5f} | {dice.min():8.5f} | {100 * (1 - dice.mean()):23.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
