"""Tiny nnU-Net raw datasets made on the fly: bright discs on noisy backgrounds, RGB PNG."""
from pathlib import Path

import numpy as np
from PIL import Image


def toy_case(rng: np.random.Generator, height: int, width: int, num_classes: int = 1, noise: float = 20):
    yy, xx = np.mgrid[:height, :width]
    label = np.zeros((height, width), np.uint8)
    image = rng.normal(90, noise, (height, width, 3))
    for c in range(1, num_classes + 1):
        r = rng.uniform(0.12, 0.25) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        label[disc] = c
        image[disc] += (70 * c, 40, -30 * c)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_toy_dataset(raw: Path, dataset_id: int, num_train: int = 10, num_test: int = 2, height: int = 48,
                      width: int = 64, num_classes: int = 1, seed: int = 0, noise: float = 20) -> Path:
    """``noise``: the pixel noise's standard deviation; at 60 a per-pixel colour rule confuses many pixels
    (``per_pixel_rule_dice``) and only the shapes' context separates the classes well."""
    folder = Path(raw) / f"Dataset{dataset_id:03d}_Toy"
    rng = np.random.default_rng(seed)
    for split, n in (("Tr", num_train), ("Ts", num_test)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir()
        for i in range(n):
            image, label = toy_case(rng, height, width, num_classes, noise)
            Image.fromarray(image).save(folder / f"images{split}" / f"toy_{split}{i:03d}_0000.png")
            Image.fromarray(label).save(folder / f"labels{split}" / f"toy_{split}{i:03d}.png")
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json  # head tests run without it
    labels = {"background": 0, **{f"class{c}": c for c in range(1, num_classes + 1)}}
    generate_dataset_json(str(folder), {0: "R", 1: "G", 2: "B"}, labels, num_train, ".png", dataset_name=folder.name)
    return folder


def nearest_mean_colour_rule(training_pairs, num_classes: int):
    """The simple per-pixel rule: each pixel gets the class whose mean colour over the training (image, label)
    pairs is nearest (no spatial context). Returns the rule, image (H, W, 3) -> label map."""
    sums, counts = np.zeros((num_classes + 1, 3)), np.zeros(num_classes + 1)
    for image, label in training_pairs:
        for c in range(num_classes + 1):
            sums[c] += image[label == c].sum(0)
            counts[c] += (label == c).sum()
    means = sums / counts[:, None]
    return lambda image: np.argmin(((np.asarray(image, float)[..., None, :] - means) ** 2).sum(-1), axis=-1)


def image_label_pairs(dataset: Path, split: str):
    for f in sorted((dataset / f"labels{split}").glob("*.png")):
        image = np.asarray(Image.open(dataset / f"images{split}" / f.name.replace(".png", "_0000.png")), float)
        yield image, np.asarray(Image.open(f))


def per_pixel_rule_dice(dataset: Path, num_classes: int) -> list:
    """The Dice per foreground class on imagesTs/labelsTs, pooled, of nearest_mean_colour_rule fitted on
    imagesTr/labelsTr."""
    rule = nearest_mean_colour_rule(image_label_pairs(dataset, "Tr"), num_classes)
    inter, total = np.zeros(num_classes + 1), np.zeros(num_classes + 1)
    for image, label in image_label_pairs(dataset, "Ts"):
        predicted = rule(image)
        for c in range(1, num_classes + 1):
            inter[c] += ((predicted == c) & (label == c)).sum()
            total[c] += (predicted == c).sum() + (label == c).sum()
    return [2 * inter[c] / total[c] for c in range(1, num_classes + 1)]


def pooled_dice(dataset: Path, num_classes: int, predicted_folder: Path | None = None,
                rule=None) -> list:
    """Dice per foreground class over all labelsTs pixels pooled, as per_pixel_rule_dice: of the label maps in
    ``predicted_folder``, or of ``rule(reference, c)`` (a trivial prediction of class c)."""
    inter, total = np.zeros(num_classes + 1), np.zeros(num_classes + 1)
    for f in sorted((dataset / "labelsTs").glob("*.png")):
        reference = np.asarray(Image.open(f))
        for c in range(1, num_classes + 1):
            prediction = rule(reference, c) if rule else np.asarray(Image.open(predicted_folder / f.name))
            inter[c] += ((prediction == c) & (reference == c)).sum()
            total[c] += (prediction == c).sum() + (reference == c).sum()
    return [2 * inter[c] / total[c] for c in range(1, num_classes + 1)]


def all_foreground_dice(dataset: Path, num_classes: int) -> list:
    """Per class: every pixel predicted as that class."""
    return pooled_dice(dataset, num_classes, rule=lambda reference, c: np.full_like(reference, c))


def assert_beats_trivial_rules(predicted_folder: Path, dataset: Path, num_classes: int, margin: float) -> list:
    """Each foreground class's pooled Dice is at least ``margin`` above both trivial rules'; returns the Dice."""
    model = pooled_dice(dataset, num_classes, predicted_folder)
    for c, ours, fg, rule in zip(range(1, num_classes + 1), model, all_foreground_dice(dataset, num_classes),
                                 per_pixel_rule_dice(dataset, num_classes)):
        assert ours >= max(fg, rule) + margin, (f"class {c}: Dice {ours:.3f}, all-foreground {fg:.3f}, "
                                                f"per-pixel colour rule {rule:.3f}")
    return model
