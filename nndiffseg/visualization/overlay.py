"""Pictures for a reader: predicted (and reference) label boundaries drawn over the image, and
per-pixel uncertainty maps as heat maps beside it."""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from nndiffseg.errors import NnDiffSegError
from nndiffseg.files import write_atomically

# Foreground class c is drawn in PALETTE[(c - 1) % len(PALETTE)]; green is kept for the reference.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("yellow", (255, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("magenta", (255, 0, 255)),
    ("orange", (255, 140, 0)),
    ("blue", (60, 120, 255)),
    ("red", (255, 30, 30)),
)
REFERENCE_COLOUR: tuple[str, tuple[int, int, int]] = ("green", (0, 220, 0))
_BACKGROUND = (32, 32, 32)
_TEXT = (235, 235, 235)
_GAP = 4
# small images are enlarged (by whole pixels) until a panel is at least this wide, so that a contour can be followed
MIN_PANEL_WIDTH = 400
_FONT_PX = 14  # legend and title: small beside a panel of MIN_PANEL_WIDTH, readable at 100 %
# Endings of 2D image files that PIL reads (the ones nnU-Net's NaturalImage2DIO accepts).
_NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")


def class_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(label - 1) % len(PALETTE)][1]


def _to_display_rgb(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RGB uint8 image of spatial ``shape``: RGB uint8 as is; anything else percentile-rescaled."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[:2] != shape and image.shape[1:] == shape:
        image = np.moveaxis(image, 0, -1)  # channel-first, as nnU-Net holds images
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[:2] != shape or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise NnDiffSegError(f"image of shape {image.shape} does not match a label map of shape {shape} "
                             f"(expected ({shape[0]}, {shape[1]}) or ({shape[0]}, {shape[1]}, 3))")
    if image.ndim == 3 and image.dtype == np.uint8:
        return image.copy()
    # Single-channel or non-uint8 images: rescale the 0.5-99.5 percentile range to 0-255 (a float
    # RGB image keeps its colours, rescaled jointly over its channels).
    values = image.astype(np.float64)
    finite = np.isfinite(values)
    lo, hi = np.percentile(values[finite], [0.5, 99.5]) if finite.any() else (0.0, 1.0)
    scaled = np.clip((np.where(finite, values, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    grey = np.round(scaled * 255).astype(np.uint8)
    return grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, axis=-1)


def _as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise NnDiffSegError(f"{what} must be a 2D label map, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise NnDiffSegError(f"{what} must hold integer class labels, got non-integer values "
                                 f"(dtype {labels.dtype})")
        labels = labels.astype(np.int64)
    return labels


def _inner_boundary(region: np.ndarray, thickness: int) -> np.ndarray:
    # border_value=1: a region running off the picture is not outlined along the picture's edge.
    return region & ~ndimage.binary_erosion(region, iterations=thickness, border_value=1)


def overlay_contours(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None = None,
                     thickness: int = 1) -> np.ndarray:
    """RGB uint8 picture of ``image`` with the boundaries of each foreground class of ``prediction``
    in its palette colour (1 yellow, 2 cyan, 3 magenta, 4 orange, 5 blue, 6 red, then again) and,
    if given, the boundaries of ``reference`` in green.

    Boundaries are inner boundaries (label pixels whose ``thickness``-fold erosion removes them), so
    they lie on the labelled pixels. Where prediction and reference boundaries coincide the
    prediction's colour is shown. ``image``: RGB uint8 (H, W, 3) is shown as is; single-channel or
    non-uint8 images are rescaled by their 0.5-99.5 percentiles; (C, H, W) is accepted too."""
    if thickness < 1:
        raise NnDiffSegError(f"thickness must be at least 1, got {thickness}")
    prediction = _as_labels(prediction, "prediction")
    picture = _to_display_rgb(image, prediction.shape)
    if reference is not None:
        reference = _as_labels(reference, "reference")
        if reference.shape != prediction.shape:
            raise NnDiffSegError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
        reference_edges = np.zeros(reference.shape, dtype=bool)
        for label in np.unique(reference[reference > 0]):
            reference_edges |= _inner_boundary(reference == label, thickness)
        picture[reference_edges] = REFERENCE_COLOUR[1]
    for label in np.unique(prediction[prediction > 0]):
        picture[_inner_boundary(prediction == label, thickness)] = class_colour(int(label))
    return picture


def _uncertainty_vmax(uncertainty: np.ndarray, vmax: float | None) -> float:
    if vmax is None:
        finite = uncertainty[np.isfinite(uncertainty)]
        vmax = float(finite.max()) if finite.size else 0.0
        return vmax if vmax > 0 else 1.0
    if not vmax > 0:
        raise NnDiffSegError(f"vmax must be positive, got {vmax}")
    return float(vmax)


def _magma(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with matplotlib's magma colormap (no figure needed)."""
    import matplotlib  # imported here: only the uncertainty pictures need it

    return matplotlib.colormaps["magma"](values, bytes=True)[..., :3]


def uncertainty_panel(uncertainty: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """RGB uint8 heat map (magma: dark = certain, bright = uncertain) of a 2D map scaled to [0, vmax];
    vmax defaults to the map's maximum (1 where that is 0). Values outside are clipped, NaN shows as 0."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if uncertainty.ndim == 3 and uncertainty.shape[0] == 1:
        uncertainty = uncertainty[0]
    if uncertainty.ndim != 2:
        raise NnDiffSegError(f"uncertainty must be a 2D map, got shape {uncertainty.shape}")
    vmax = _uncertainty_vmax(uncertainty, vmax)
    scaled = np.clip(np.nan_to_num(uncertainty / vmax, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    return _magma(scaled)


def _legend_items(prediction: np.ndarray, reference: np.ndarray | None,
                  uncertainty_vmax: float | None) -> list[tuple[str, object]]:
    """(text, swatch) pairs; a swatch is an RGB colour, or "magma" for a colour bar."""
    labels = [int(v) for v in np.unique(prediction[prediction > 0])]
    if labels == [1] or not labels:
        items: list[tuple[str, object]] = [(f"prediction ({PALETTE[0][0]})", PALETTE[0][1])]
    else:
        items = [(f"prediction class {v} ({PALETTE[(v - 1) % len(PALETTE)][0]})", class_colour(v)) for v in labels]
    if reference is not None:
        items.append((f"reference ({REFERENCE_COLOUR[0]})", REFERENCE_COLOUR[1]))
    if uncertainty_vmax is not None:
        items.append((f"uncertainty 0..{uncertainty_vmax:.3g}", "magma"))
    return items


def save_overlay(out_png: str | Path, image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None = None,
                 uncertainty: np.ndarray | None = None, title: str | None = None,
                 uncertainty_vmax: float | None = None, min_panel_width: int | None = None) -> None:
    """Write a PNG: an optional title line, the contour overlay (see ``overlay_contours``), the
    uncertainty heat map to its right when given (same height, ``uncertainty_vmax`` as in
    ``uncertainty_panel``), and a legend strip below. Pictures keep the image's pixel size, or are enlarged
    by a whole factor (each pixel a square block) until a panel is at least ``min_panel_width`` wide; the
    canvas only grows wider than the panels where a legend line would not fit."""
    prediction = _as_labels(prediction, "prediction")
    panels = [overlay_contours(image, prediction, reference)]
    vmax = None
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=np.float64)
        if uncertainty.ndim == 3 and uncertainty.shape[0] == 1:
            uncertainty = uncertainty[0]
        if uncertainty.shape != prediction.shape:
            raise NnDiffSegError(f"uncertainty shape {uncertainty.shape} differs from prediction shape "
                                 f"{prediction.shape}")
        vmax = _uncertainty_vmax(uncertainty, uncertainty_vmax)
        panels.append(uncertainty_panel(uncertainty, vmax))
    factor = max(1, -(-min_panel_width // prediction.shape[1])) if min_panel_width else 1
    if factor > 1:
        panels = [panel.repeat(factor, axis=0).repeat(factor, axis=1) for panel in panels]
        prediction = prediction.repeat(factor, axis=0).repeat(factor, axis=1)

    font = _font()
    line_height = _FONT_PX + 4
    swatch, bar = _FONT_PX - 2, 40
    items = _legend_items(prediction, reference, vmax)
    item_widths = [swatch + 4 + int(np.ceil(font.getlength(text))) + (bar + 4 if s == "magma" else 0)
                   for text, s in items]
    title_width = int(np.ceil(font.getlength(title))) if title else 0
    height, width = prediction.shape
    panels_width = len(panels) * width + (len(panels) - 1) * _GAP
    canvas_width = max(panels_width, max(item_widths) + 2 * _GAP, title_width + 2 * _GAP)

    # Legend items flow left to right and wrap onto new lines.
    placed, x, y = [], _GAP, 0
    for (text, s), w in zip(items, item_widths):
        if x > _GAP and x + w > canvas_width - _GAP:
            x, y = _GAP, y + line_height
        placed.append((x, y, text, s))
        x += w + 3 * _GAP
    top = line_height + 2 if title else 0
    legend_top = top + height + _GAP
    canvas = Image.new("RGB", (canvas_width, legend_top + y + line_height + _GAP), _BACKGROUND)
    for i, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel, mode="RGB"), (i * (width + _GAP), top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_GAP, 2), title, fill=_TEXT, font=font)
    for x, y, text, s in placed:
        y0 = legend_top + y
        if s == "magma":
            ramp = _magma(np.linspace(0, 1, bar))[None].repeat(swatch, axis=0)
            canvas.paste(Image.fromarray(np.ascontiguousarray(ramp), mode="RGB"), (x, y0 + 3))
            x += bar + 4
        else:
            draw.rectangle((x, y0 + 3, x + swatch - 1, y0 + 2 + swatch), fill=s)
            x += swatch + 4
        draw.text((x, y0), text, fill=_TEXT, font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(out_png), lambda name: canvas.save(name, format="PNG"))


def _font() -> ImageFont.ImageFont:
    """Pillow's own scalable font (no font file needed) where Pillow has FreeType, else its bitmap font."""
    try:
        return ImageFont.load_default(size=_FONT_PX)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _read_picture(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            if picture.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                return np.asarray(picture.convert("RGB"))
            return np.asarray(picture)
    except OSError as e:
        raise NnDiffSegError(f"cannot read image {path}: {e}") from e


def _read_labels(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            labels = np.asarray(picture)
    except OSError as e:
        raise NnDiffSegError(f"cannot read label file {path}: {e}") from e
    if labels.ndim != 2:
        raise NnDiffSegError(f"label file {path} is not a single-channel label map (shape {labels.shape})")
    return labels


def write_overlays(image_folder: str | Path, prediction_folder: str | Path, out_folder: str | Path,
                   reference_folder: str | Path | None = None, file_ending: str = ".png") -> list[Path]:
    """Write ``out_folder/CASE_overlay.png`` for every ``CASE<file_ending>`` in ``prediction_folder``.

    For nnU-Net 2D datasets stored as natural-image files (PNG; BMP/TIFF are read the same way but
    untested): the image is ``image_folder/CASE_0000<file_ending>``, either one RGB file or the
    first of single-channel files ``CASE_0000``, ``CASE_0001``, ... (channel 0 is shown). With
    ``reference_folder``, ``CASE<file_ending>`` there is drawn in green and must exist.
    NIfTI and other 3D formats are not supported. Returns the written paths, sorted by case."""
    if file_ending.lower() not in _NATURAL_IMAGE_ENDINGS:
        raise NnDiffSegError(f"overlays are drawn only for 2D image files ({', '.join(_NATURAL_IMAGE_ENDINGS)}), "
                             f"got file ending {file_ending!r}")
    image_folder, prediction_folder, out_folder = Path(image_folder), Path(prediction_folder), Path(out_folder)
    folders = [image_folder, prediction_folder] + ([Path(reference_folder)] if reference_folder is not None else [])
    for folder in folders:
        if not folder.is_dir():
            raise NnDiffSegError(f"folder not found: {folder}")
    predictions = sorted(p for p in prediction_folder.iterdir() if p.is_file() and p.name.endswith(file_ending))
    if not predictions:
        raise NnDiffSegError(f"no predictions ending in {file_ending} found in {prediction_folder}")

    written = []
    for prediction_file in predictions:
        case = prediction_file.name[: -len(file_ending)]
        image_file = image_folder / f"{case}_0000{file_ending}"
        if not image_file.is_file():
            raise NnDiffSegError(f"image for prediction {prediction_file} not found: {image_file}")
        reference = None
        if reference_folder is not None:
            reference_file = Path(reference_folder) / f"{case}{file_ending}"
            if not reference_file.is_file():
                raise NnDiffSegError(f"reference for prediction {prediction_file} not found: {reference_file}")
            reference = _read_labels(reference_file)
        prediction = _read_labels(prediction_file)
        image = _read_picture(image_file)
        if image.shape[:2] != prediction.shape or (reference is not None and reference.shape != prediction.shape):
            raise NnDiffSegError(
                f"sizes differ for case {case}: image {image_file} {image.shape[:2]}, prediction {prediction.shape}"
                + (f", reference {reference.shape}" if reference is not None else ""))
        out_png = out_folder / f"{case}_overlay.png"
        save_overlay(out_png, image, prediction, reference, title=case, min_panel_width=MIN_PANEL_WIDTH)
        written.append(out_png)
    return written
