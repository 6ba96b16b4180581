"""Tiny nnU-Net raw datasets made on the fly: bright discs on noisy backgrounds, RGB PNG."""
from pathlib import Path

import numpy as np
from PIL import Image


def toy_case(rng: np.random.Generator, height: int, width: int, num_classes: int = 1):
    yy, xx = np.mgrid[:height, :width]
    label = np.zeros((height, width), np.uint8)
    image = rng.normal(90, 20, (height, width, 3))
    for c in range(1, num_classes + 1):
        r = rng.uniform(0.12, 0.25) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        label[disc] = c
        image[disc] += (70 * c, 40, -30 * c)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_toy_dataset(raw: Path, dataset_id: int, num_train: int = 10, num_test: int = 2, height: int = 48,
                      width: int = 64, num_classes: int = 1, seed: int = 0) -> Path:
    folder = Path(raw) / f"Dataset{dataset_id:03d}_Toy"
    rng = np.random.default_rng(seed)
    for split, n in (("Tr", num_train), ("Ts", num_test)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir()
        for i in range(n):
            image, label = toy_case(rng, height, width, num_classes)
            Image.fromarray(image).save(folder / f"images{split}" / f"toy_{split}{i:03d}_0000.png")
            Image.fromarray(label).save(folder / f"labels{split}" / f"toy_{split}{i:03d}.png")
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json  # head tests run without it
    labels = {"background": 0, **{f"class{c}": c for c in range(1, num_classes + 1)}}
    generate_dataset_json(str(folder), {0: "R", 1: "G", 2: "B"}, labels, num_train, ".png", dataset_name=folder.name)
    return folder
