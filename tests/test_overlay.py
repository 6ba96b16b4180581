import numpy as np
import pytest
from PIL import Image

from nndiffseg.errors import NnDiffSegError
from nndiffseg.visualization.overlay import overlay_contours, save_overlay, uncertainty_panel, write_overlays

YELLOW, CYAN, MAGENTA, GREEN = (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 220, 0)


def _square(shape, top, left, size, value=1):
    labels = np.zeros(shape, dtype=np.uint8)
    labels[top:top + size, left:left + size] = value
    return labels


def _ring(shape, top, left, size, width=1):
    outer = _square(shape, top, left, size).astype(bool)
    inner = _square(shape, top + width, left + width, size - 2 * width).astype(bool)
    return outer & ~inner


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 100, (20, 24, 3), dtype=np.uint8)


def test_class_boundaries_coloured_rest_untouched(image):
    prediction = _square((20, 24), 2, 2, 6) + _square((20, 24), 10, 12, 6, 2) + _square((20, 24), 2, 14, 5, 3)
    original = image.copy()
    out = overlay_contours(image, prediction)
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8
    assert np.array_equal(image, original)  # input not modified
    edges = {}
    for colour, (top, left, size) in ((YELLOW, (2, 2, 6)), (CYAN, (10, 12, 6)), (MAGENTA, (2, 14, 5))):
        ring = _ring((20, 24), top, left, size)
        assert (out[ring] == colour).all()
        edges[colour] = ring
    untouched = ~(edges[YELLOW] | edges[CYAN] | edges[MAGENTA])
    assert np.array_equal(out[untouched], image[untouched])  # interiors and background keep the image
    assert (out[3:7, 3:7] == image[3:7, 3:7]).all()


def test_palette_cycles_and_thickness(image):
    prediction = _square((20, 24), 2, 2, 10, 7)  # 7 = 6 + 1: back to yellow
    out = overlay_contours(image, prediction, thickness=2)
    ring = _ring((20, 24), 2, 2, 10, width=2)
    assert (out[ring] == YELLOW).all()
    assert np.array_equal(out[~ring], image[~ring])


def test_region_at_picture_edge_not_outlined_along_edge(image):
    prediction = _square((20, 24), 0, 0, 6)
    out = overlay_contours(image, prediction)
    assert np.array_equal(out[0, :5], image[0, :5]) and np.array_equal(out[:5, 0], image[:5, 0])
    assert (out[5, :6] == YELLOW).all() and (out[:6, 5] == YELLOW).all()


def test_reference_boundary_green(image):
    prediction = _square((20, 24), 2, 2, 8)
    reference = _square((20, 24), 6, 8, 8)
    out = overlay_contours(image, prediction, reference)
    prediction_ring, reference_ring = _ring((20, 24), 2, 2, 8), _ring((20, 24), 6, 8, 8)
    assert (out[prediction_ring] == YELLOW).all()  # prediction on top where they cross
    assert (out[reference_ring & ~prediction_ring] == GREEN).all()
    rest = ~(prediction_ring | reference_ring)
    assert np.array_equal(out[rest], image[rest])


def test_grayscale_float_image_rescaled():
    values = np.linspace(0.0, 1.0, 20 * 24).reshape(20, 24) * 1000.0
    values[0, 0] = 1e9  # an outlier the percentile scaling ignores
    out = overlay_contours(values, np.zeros((20, 24), dtype=np.uint8))
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    grey = out[..., 0].astype(int)
    assert grey[0, 0] == 255 and grey[0, 1] == 0 and grey[19, 22] == 255
    assert 120 < grey[10, 0] < 135  # the middle of the range is mid-grey
    assert (np.diff(grey.ravel()[1:-2]) >= 0).all()


def test_channel_first_and_single_channel_inputs():
    rgb = np.random.default_rng(1).integers(0, 255, (3, 10, 12), dtype=np.uint8)
    out = overlay_contours(rgb, np.zeros((10, 12), dtype=np.uint8))
    assert np.array_equal(out, np.moveaxis(rgb, 0, -1))
    with pytest.raises(NnDiffSegError, match="shape"):
        overlay_contours(np.zeros((9, 12, 3), dtype=np.uint8), np.zeros((10, 12), dtype=np.uint8))
    with pytest.raises(NnDiffSegError, match="integer"):
        overlay_contours(np.zeros((10, 12, 3), dtype=np.uint8), np.full((10, 12), 0.5))


def test_uncertainty_panel_brighter_for_higher_values():
    ramp = np.tile(np.linspace(0, 2, 16), (4, 1))
    panel = uncertainty_panel(ramp)
    assert panel.shape == (4, 16, 3) and panel.dtype == np.uint8
    luminance = panel.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance[0]) > 0).all()
    assert luminance[0, 0] < 20 and luminance[0, -1] > 200
    clipped = uncertainty_panel(ramp, vmax=1.0)
    assert np.array_equal(clipped[0, -1], clipped[0, 8]) and not np.array_equal(clipped[0, 0], clipped[0, 8])
    zeros = uncertainty_panel(np.zeros((3, 3)))  # default vmax 1: no division by zero
    assert (zeros == zeros[0, 0]).all()


def test_save_overlay_sizes(tmp_path, image):
    image = np.random.default_rng(0).integers(0, 255, (60, 160, 3), dtype=np.uint8)
    prediction = _square((60, 160), 10, 20, 30)
    save_overlay(tmp_path / "plain.png", image, prediction)
    uncertainty = np.random.default_rng(0).random((60, 160))
    save_overlay(tmp_path / "sub" / "full.png", image, prediction, prediction, uncertainty,
                 title="case")
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "sub" / "full.png") as full:
        assert plain.format == "PNG" and plain.mode == "RGB"
        assert plain.width == 160 and plain.height > 60
        assert full.width == 2 * 160 + 4 and full.height > plain.height
        plain, full = np.asarray(plain), np.asarray(full)
    assert np.array_equal(plain[:60], overlay_contours(image, prediction))
    top = _panel_top(full[:, :160], overlay_contours(image, prediction, prediction))
    assert top > 0  # below the title line
    assert np.array_equal(full[top:top + 60, 164:], uncertainty_panel(np.random.default_rng(0).random((60, 160))))


def _panel_top(picture, panel):
    """Row at which ``panel`` appears (left-aligned) in ``picture``, or None."""
    for top in range(picture.shape[0] - panel.shape[0] + 1):
        if np.array_equal(picture[top:top + panel.shape[0]], panel):
            return top
    return None


def _write(path, array):
    Image.fromarray(array).save(path)


def test_write_overlays_rgb_dataset(tmp_path):
    images, predictions, references = (tmp_path / n for n in ("imagesTs", "pred", "labelsTs"))
    for folder in (images, predictions, references):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for case in ("case_b", "case_a"):
        _write(images / f"{case}_0000.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        _write(predictions / f"{case}.png", _square((40, 50), 5, 5, 20))
        _write(references / f"{case}.png", _square((40, 50), 8, 8, 20))
    (predictions / "summary.json").write_text("{}")
    written = write_overlays(images, predictions, tmp_path / "out", references)
    assert written == [tmp_path / "out" / "case_a_overlay.png", tmp_path / "out" / "case_b_overlay.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_a_overlay.png", "case_b_overlay.png"]
    picture = np.asarray(Image.open(written[0]))
    assert (picture == GREEN).all(axis=-1).any() and (picture == YELLOW).all(axis=-1).any()

    (references / "case_b.png").unlink()
    with pytest.raises(NnDiffSegError, match="case_b.png"):
        write_overlays(images, predictions, tmp_path / "out", references)
    (images / "case_a_0000.png").unlink()
    with pytest.raises(NnDiffSegError, match="case_a_0000.png"):
        write_overlays(images, predictions, tmp_path / "out")


def test_write_overlays_single_channel_dataset_shows_channel_0(tmp_path):
    images, predictions = tmp_path / "images", tmp_path / "pred"
    images.mkdir(), predictions.mkdir()
    channel0 = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))
    _write(images / "ct_0000.png", channel0)
    _write(images / "ct_0001.png", np.full((40, 50), 200, dtype=np.uint8))
    prediction = _square((40, 50), 5, 5, 20, 2)
    _write(predictions / "ct.png", prediction)
    [out] = write_overlays(images, predictions, tmp_path / "out")
    picture = np.asarray(Image.open(out))
    factor = 8  # enlarged until the panel is at least MIN_PANEL_WIDTH (400 px) wide
    expected = overlay_contours(channel0, prediction).repeat(factor, axis=0).repeat(factor, axis=1)
    assert _panel_top(picture[:, :50 * factor], expected) is not None
    with pytest.raises(NnDiffSegError, match="2D image files"):
        write_overlays(images, predictions, tmp_path / "out", file_ending=".nii.gz")


def test_small_pictures_are_enlarged_by_whole_pixels(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    prediction = _square((30, 50), 5, 5, 10)
    uncertainty = np.random.default_rng(1).random((30, 50))
    save_overlay(tmp_path / "big.png", image, prediction, uncertainty=uncertainty, min_panel_width=120)
    picture = np.asarray(Image.open(tmp_path / "big.png"))
    factor = 3  # the smallest whole factor that makes 50 px at least 120 px
    assert picture.shape[1] == 2 * 50 * factor + 4
    expected = overlay_contours(image, prediction).repeat(factor, axis=0).repeat(factor, axis=1)
    assert np.array_equal(picture[:30 * factor, :50 * factor], expected)
    heat = uncertainty_panel(uncertainty).repeat(factor, axis=0).repeat(factor, axis=1)
    assert np.array_equal(picture[:30 * factor, 50 * factor + 4:], heat)
