"""nnDiffSeg_evaluate -raters: each case's samples (or its prediction) scored against its own raters' masks, the
dataset block, a picture per case, and refusals that write nothing."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nndiffseg.errors import NnDiffSegError
from nndiffseg.evaluation.evaluate import evaluate_folders


def square(top: int, left: int, size: int = 6, shape=(24, 24)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


def save(array: np.ndarray, file) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(file)


# case "same": the samples are the raters themselves; case "blank": every sample is empty while the raters mark
# squares that overlap pairwise by half (IoU 1/3), so E d(S, Y) = 1, E d(S, S') = 0, E d(Y, Y') = (2/3)(2/3) * ...
RATERS = {"same": [square(2, 2), square(2, 5), square(8, 8), square(8, 8)],
          "blank": [square(4, 4), square(4, 7), square(4, 4), square(4, 7)]}


@pytest.fixture
def folders(tmp_path):
    root = tmp_path / "Dataset001_R"
    for case, raters in RATERS.items():
        for r, mask in enumerate(raters, 1):
            save(mask, root / "ratersTs" / f"{case}_rater{r:02d}.png")
        save((np.sum(raters, axis=0) > 2).astype(np.uint8), root / "labelsTs" / f"{case}.png")
        save(np.full((24, 24), 100, np.uint8), root / "imagesTs" / f"{case}_0000.png")
        samples = raters if case == "same" else [np.zeros((24, 24), np.uint8)] * 4
        for k, mask in enumerate(samples):
            save(mask, tmp_path / "pred" / "samples" / f"sample_{k}" / f"{case}.png")
        save(samples[0], tmp_path / "pred" / f"{case}.png")
    return root, tmp_path / "pred"


def test_samples_are_scored_against_their_own_raters(folders):
    root, pred = folders
    summary = evaluate_folders(str(root / "labelsTs"), str(pred), num_processes=1, raters_folder=str(root / "ratersTs"))
    scores = {c["case"]: c["raters"]["1"] for c in summary["cases"]}
    assert scores["same"]["ged_squared"] == pytest.approx(0, abs=1e-12) and scores["same"]["hm_iou"] == 1
    # blank: d(S, Y) = 1 for every pair, the samples agree (0); raters: of 16 ordered pairs 8 are equal (d 0),
    # 8 overlap by 18 of 54 pixels (d = 1 - 1/3 = 2/3), so E d(Y, Y') = 1/3 and GED² = 2 - 0 - 1/3
    assert scores["blank"]["ged_squared"] == pytest.approx(5 / 3)
    assert scores["blank"]["hm_iou"] == 0 and scores["blank"]["sample_diversity"] == 0
    assert summary["raters"]["mean"]["hm_iou"] == pytest.approx(0.5)
    picture = Image.open(pred / "summary_figures" / "raters" / "same.png")
    assert picture.size[0] >= 1200, picture.size  # 6 panels of about 240 px
    saved = json.loads((pred / "summary.json").read_text())
    assert saved["cases"][0]["raters"]["1"]["hm_iou"] in (0, 1)


def test_without_samples_the_prediction_is_the_one_sample(folders):
    root, pred = folders
    shutil.rmtree(pred / "samples")
    summary = evaluate_folders(str(root / "labelsTs"), str(pred), num_processes=1, raters_folder=str(root / "ratersTs"),
                               plots=False)
    same = next(c for c in summary["cases"] if c["case"] == "same")["raters"]["1"]
    assert same["sample_diversity"] == 0 and same["hm_iou"] < 1  # one rater's mask matched against four
    assert not (pred / "summary_figures").exists()


def test_a_missing_rater_is_named_and_nothing_is_written(folders):
    root, pred = folders
    (root / "ratersTs" / "blank_rater03.png").unlink()
    with pytest.raises(NnDiffSegError, match="missing rater mask .*blank_rater03.png"):
        evaluate_folders(str(root / "labelsTs"), str(pred), num_processes=1, raters_folder=str(root / "ratersTs"))
    assert not (pred / "summary.json").exists() and not (pred / "summary_figures").exists()


def test_the_command_prints_the_rater_table(folders):
    root, pred = folders
    result = subprocess.run([sys.executable, "-m", "nndiffseg.evaluation.evaluate", "-ref", root / "labelsTs", "-pred",
                             pred, "-raters", root / "ratersTs", "-np", "1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "against the raters" in result.stdout and "HM-IoU" in result.stdout
