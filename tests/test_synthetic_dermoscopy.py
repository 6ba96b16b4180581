import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.measure import label, perimeter

from nndiffseg.demo.synthetic_dermoscopy import main, make_case, write_isic2016_layout
from nndiffseg.errors import NnDiffSegError

LAYOUT = ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth",
          "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")


@pytest.fixture(scope="module")
def cases():
    return [make_case(np.random.default_rng([0, i]), 96, 128) for i in range(30)]


def _grey(image):
    return image.astype(np.float64).mean(axis=-1)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_formats(tmp_path):
    out = write_isic2016_layout(tmp_path / "isic", num_train=3, num_test=2, height=30, width=40, seed=1)
    assert out == tmp_path / "isic"
    assert sorted(p.name for p in out.iterdir()) == sorted(LAYOUT)
    names = {folder: sorted(p.name for p in (out / folder).iterdir()) for folder in LAYOUT}
    assert names[LAYOUT[0]] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg", "ISIC_0000002.jpg"]
    assert names[LAYOUT[1]] == [f"ISIC_000000{i}_Segmentation.png" for i in range(3)]
    assert names[LAYOUT[2]] == ["ISIC_0000003.jpg", "ISIC_0000004.jpg"]
    assert names[LAYOUT[3]] == ["ISIC_0000003_Segmentation.png", "ISIC_0000004_Segmentation.png"]
    for folder in (LAYOUT[0], LAYOUT[2]):
        for p in (out / folder).iterdir():
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))
    for folder in (LAYOUT[1], LAYOUT[3]):
        for p in (out / folder).iterdir():
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "L", (40, 30))
                assert set(np.unique(np.asarray(im)).tolist()) == {0, 255}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(write_isic2016_layout(tmp_path / "a", 2, 1, seed=5))
    b = _files(write_isic2016_layout(tmp_path / "b", 2, 1, seed=5))
    c = _files(write_isic2016_layout(tmp_path / "c", 2, 1, seed=6))
    assert len(a) == 6 and a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_make_case_deterministic_shape_and_dtype():
    image, mask = make_case(np.random.default_rng(3), 48, 64)
    image2, mask2 = make_case(np.random.default_rng(3), 48, 64)
    other, _ = make_case(np.random.default_rng(4), 48, 64)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 64) and mask.dtype == bool
    assert np.array_equal(image, image2) and np.array_equal(mask, mask2)
    assert not np.array_equal(image, other)


def test_lesion_fraction_sensible(cases):
    fractions = np.array([mask.mean() for _, mask in cases])
    assert fractions.min() > 0.01 and fractions.max() < 0.6
    assert 0.05 < fractions.mean() < 0.4
    assert fractions.std() > 0.03  # sizes vary


def test_one_lesion_per_mask_and_no_hair_in_it(cases):
    dark_outside = 0
    for image, mask in cases:
        assert label(mask).max() == 1
        # Hair strokes are 1-2 px wide: were they in the mask, an opening would remove them.
        opened = ndimage.binary_opening(mask, structure=np.ones((3, 3)))
        assert (mask & ~opened).sum() < 0.03 * mask.sum()
        thin_dark = ndimage.black_tophat(_grey(image), size=5) > 35
        dark_outside += (thin_dark & ~mask).sum()
        assert not np.array_equal(mask, _grey(image) < np.percentile(_grey(image), 100 * (1 - mask.mean())))
    # Hairs (thin dark strokes) do exist, mostly on the skin outside the lesion.
    assert dark_outside > 30 * 100


def test_lesion_darker_than_skin(cases):
    differences = np.array([_grey(image)[~mask].mean() - _grey(image)[mask].mean() for image, mask in cases])
    assert (differences > 5).all()
    assert differences.mean() > 30
    assert differences.min() < 40  # some lesions are faint


def test_border_irregular(cases):
    def compactness(mask):
        return perimeter(mask) ** 2 / mask.sum() / (4 * np.pi)

    yy, xx = np.mgrid[0:96, 0:128]
    assert compactness(np.hypot(yy - 48, xx - 64) < 25) < 1.1  # the measure itself: a disk is ~1
    ratios = np.array([compactness(mask) for _, mask in cases])
    assert (ratios > 1.15).mean() >= 0.8


def test_make_case_fast():
    durations = []
    for i in range(8):
        start = time.perf_counter()
        make_case(np.random.default_rng(i), 96, 128)
        durations.append(time.perf_counter() - start)
    assert np.median(durations) < 0.1


def test_main_writes_layout(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--num_train", "2", "--num_test", "1", "--height", "24",
                 "--width", "32", "--seed", "2"]) == 0
    assert len(list((tmp_path / "out" / LAYOUT[0]).glob("ISIC_*.jpg"))) == 2
    assert [p.name for p in (tmp_path / "out" / LAYOUT[3]).iterdir()] == ["ISIC_0000002_Segmentation.png"]
    assert "2 training and 1 test" in capsys.readouterr().out
    with pytest.raises(NnDiffSegError, match="negative"):
        main([str(tmp_path / "bad"), "--num_train", "-1"])
