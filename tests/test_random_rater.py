"""Multi-rater training data: every rater's mask preprocessed like the label, and trainers that draw a random
rater's mask per training sample (nnUNetTrainerRandomRater, the diffusion heads), validating on the majority."""
import json

import numpy as np
import pytest
import torch
from cli import PLAN_QUICKLY, assert_refused, nnunet_folders, run_batch, run_tool
from PIL import Image
from scipy import ndimage
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID, PLAIN_ID = 31, 32
RATERS = 3


def rater_masks(label: np.ndarray) -> list[np.ndarray]:
    """Three readers: one marks the disc, one a disc 2 px larger, one nothing; the majority (2 of 3) is the disc."""
    disc = label > 0
    return [disc, ndimage.binary_dilation(disc, iterations=2), np.zeros_like(disc)]


@pytest.fixture(scope="module")
def raters(module_tmp):
    root = module_tmp("random_rater")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=6, num_test=0, height=32, width=48)
    write_toy_dataset(root / "nnUNet_raw", PLAIN_ID, num_train=6, num_test=0, height=32, width=48)
    (raw / "ratersTr").mkdir()
    expected = {}
    for label_file in sorted((raw / "labelsTr").iterdir()):
        case = label_file.name[:-len(".png")]
        expected[case] = rater_masks(np.array(Image.open(label_file)))
        for r, mask in enumerate(expected[case], 1):
            Image.fromarray(mask.astype(np.uint8)).save(raw / "ratersTr" / f"{case}_rater{r:02d}.png")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**dataset_json, "num_raters": RATERS}, indent=2))
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, PLAIN_ID, *PLAN_QUICKLY, env=env)
    data = root / "nnUNet_preprocessed" / raw.name / "nnDiffSegPlans_2d"
    return {"root": root, "env": env, "raw": raw, "data": data, "expected": expected}


def _run_all(root, name: str, commands: list, env: dict) -> list:
    """Commands that share the nnU-Net folders, in one process (tests/cli.py run_batch); each must succeed."""
    ran = run_batch(root, name, commands, env)
    for (tool, args), result in zip(commands, ran):
        assert result.returncode == 0, (tool, args, result.stderr[-3000:])
    return ran


def test_each_raters_mask_is_preprocessed_like_the_label(raters):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(raters["data"]))
    assert sorted(dataset.identifiers) == sorted(raters["expected"])
    for case, masks in raters["expected"].items():
        stored = np.load(raters["data"] / f"{case}_raters.npy")
        _, seg, _, _ = dataset.load_case(case)
        assert stored.shape == (RATERS, *seg.shape) == (RATERS, 1, 1, 32, 48)
        for r, mask in enumerate(masks):
            assert np.array_equal(stored[r, 0, 0], mask), (case, r)
        assert np.array_equal(seg[0, 0], masks[0])  # the label is the majority: the disc


def test_a_training_case_is_a_random_raters_mask_and_validation_the_majority(raters):
    from nndiffseg.trainers.random_rater import RandomRaterDatasetBlosc2

    case = sorted(raters["expected"])[0]
    masks = raters["expected"][case]
    dataset = RandomRaterDatasetBlosc2(str(raters["data"]), [case])
    np.random.seed(0)
    drawn = []
    for _ in range(60):
        _, seg, _, properties = dataset.load_case(case)
        drawn.append(next(r for r, m in enumerate(masks) if np.array_equal(np.asarray(seg)[0, 0], m)))
        assert "class_locations" in properties
    counts = np.bincount(drawn, minlength=RATERS)
    assert counts.min() >= 10, counts  # each of the 3 about 20 times


def test_trainers_train_on_raters_and_refuse_what_they_cannot(raters):
    env, short = raters["env"], ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 2]
    result = run_tool("nnDiffSeg_train", DATASET_ID, "2d", 0, "-tr", "nnUNetTrainerRandomRater", *short, env=env)
    fold = raters["root"] / "nnUNet_results" / raters["raw"].name / "nnUNetTrainerRandomRater__nnDiffSegPlans__2d"
    assert (fold / "fold_0" / "checkpoint_final.pth").is_file()
    log = next((fold / "fold_0").glob("training_log_*.txt")).read_text()
    assert "3 raters per case: each training sample is one rater's mask" in log, result.stdout[-2000:]

    missing = raters["data"] / f"{sorted(raters['expected'])[1]}_raters.npy"
    kept = raters["root"] / missing.name  # outside the folder: nnU-Net refuses a folder with a third file ending
    missing.rename(kept)
    try:
        no_rater_file, no_raters = run_batch(raters["root"], "refusals", [
            ("nnDiffSeg_train", [DATASET_ID, "2d", 1, "-tr", "nnUNetTrainerRandomRater", *short]),
            ("nnDiffSeg_train", [PLAIN_ID, "2d", 0, "-tr", "nnUNetTrainerRandomRater", *short])], env)
    finally:
        kept.rename(missing)
    assert_refused(no_rater_file, [str(missing), "preprocess again with nnDiffSeg_plan_and_preprocess"])
    assert_refused(no_raters, ["nnUNetTrainerRandomRater trains on random raters", "has no num_raters",
                               "nnDiffSeg_convert_multirater"])
    assert not (raters["root"] / "nnUNet_results" / "Dataset032_Toy" / "nnUNetTrainerRandomRater__nnDiffSegPlans__2d"
                / "fold_0" / "checkpoint_final.pth").exists()


def test_the_guided_trainer_keeps_its_multirater_settings_only_on_a_multirater_dataset(raters):
    """v prediction, DDIM over 10 steps and 16 samples (nnDiffSegTrainerGuided.multirater_settings) are saved with the
    weights where the dataset has raters; a dataset without keeps the head's defaults."""
    from nndiffseg.trainers.guided import nnDiffSegTrainerGuided

    short = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 1, "--clip_model", "random"]
    results = raters["root"] / "nnUNet_results"
    configs = {}
    _run_all(raters["root"], "guided", [("nnDiffSeg_train", [dataset, "2d", 2, "-tr", "nnDiffSegTrainerGuided", *short])
                                        for dataset in (DATASET_ID, PLAIN_ID)], raters["env"])
    for dataset in (DATASET_ID, PLAIN_ID):
        checkpoint = next(results.glob(f"Dataset{dataset:03d}_*/nnDiffSegTrainerGuided__nnDiffSegPlans__2d/fold_2/"
                                       f"checkpoint_final.pth"))
        configs[dataset] = torch.load(checkpoint, weights_only=False)["network_weights"]["_extra_state"]["config"]
    settings = nnDiffSegTrainerGuided.multirater_settings
    assert settings == {"prediction_type": "v_prediction", "steps": 10, "num_samples": 16}
    assert {k: configs[DATASET_ID][k] for k in settings} == settings
    assert {k: configs[PLAIN_ID][k] for k in settings} == {"prediction_type": "sample", "steps": 1, "num_samples": 3}


def test_a_stock_trainers_folds_are_its_samples_and_their_spread_its_uncertainty(raters):
    """--save_samples / --save_uncertainty for a trainer that draws no samples: each fold's prediction is one
    sample (the label map that fold alone predicts), the uncertainty the pooled spread of the folds' probabilities."""
    from nndiffseg.inference.pooled_spread import PooledSpread

    env, root = raters["env"], raters["root"]
    short = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 2]
    predict = ["-i", raters["raw"] / "imagesTr", "-d", DATASET_ID, "-c", "2d", "-tr", "nnUNetTrainerRandomRater",
               "-device", "cpu", "-nps", 0]
    _run_all(root, "folds", [
        ("nnDiffSeg_train", [DATASET_ID, "2d", 1, "-tr", "nnUNetTrainerRandomRater", *short, "--npz"]),
        ("nnDiffSeg_predict", [*predict, "-o", root / "both", "-f", 0, 1, "--save_samples", "--save_uncertainty"]),
        *[("nnDiffSeg_predict", [*predict, "-o", root / f"fold{fold}", "-f", fold, "--save_probabilities"])
          for fold in (0, 1)]], env)
    assert sorted(p.name for p in (root / "both" / "samples").iterdir()) == ["sample_0", "sample_1"]
    for case in raters["expected"]:
        spread = PooledSpread()
        for fold in (0, 1):
            alone = np.array(Image.open(root / f"fold{fold}" / f"{case}.png"))
            assert np.array_equal(np.array(Image.open(root / "both" / "samples" / f"sample_{fold}" / f"{case}.png")),
                                  alone), (case, fold)
            spread.add(torch.from_numpy(np.load(root / f"fold{fold}" / f"{case}.npz")["probabilities"]))
        stored = np.load(root / "both" / "uncertainty" / f"{case}.npz")["uncertainty"]
        np.testing.assert_allclose(stored, spread.spread().numpy(), atol=2e-3)
    assert (root / "both" / "uncertainty" / f"{case}.png").is_file()
    # case_confidence.json: each case's Dice between its two members, computed here by hand, least agreement first
    confidence = json.loads((root / "both" / "case_confidence.json").read_text())["cases"]
    by_hand = {}
    for case in raters["expected"]:
        a, b = (np.array(Image.open(root / f"fold{fold}" / f"{case}.png")) == 1 for fold in (0, 1))
        by_hand[case] = 2 * (a & b).sum() / (a.sum() + b.sum()) if a.any() or b.any() else 1.0
    assert [c["case"] for c in confidence] == sorted(by_hand, key=lambda c: (by_hand[c], c))
    for entry in confidence:
        assert entry["members"] == 2 and abs(entry["pairwise_dice"] - by_hand[entry["case"]]) < 1e-9, entry

    # a calibrated model (nnDiffSeg_calibrate's calibration.json): the probabilities are softmax(logits / T), the
    # label maps the same; --no_calibration gives the model's own. T = 0.05 (the fit's lower bound) sharpens
    # nnU-Net's float16 logits twentyfold: scaled in float16 they would lose their margin (errors up to ~1e-2).
    from nndiffseg.evaluation.calibrate import CALIBRATION_FILE
    from nndiffseg.evaluation.temperature import LOG_T_BOUNDS, scale_probabilities
    model = root / "nnUNet_results" / raters["raw"].name / "nnUNetTrainerRandomRater__nnDiffSegPlans__2d"
    temperatures = (2.5, round(float(np.exp(LOG_T_BOUNDS[0])), 6))
    calibrated = [("nnDiffSeg_predict", [*predict, "-o", root / f"calibrated_{t}", "-f", 0, "--save_probabilities"])
                  for t in temperatures]
    try:
        (model / CALIBRATION_FILE).write_text(json.dumps({"temperature": temperatures[0]}))
        _run_all(root, "calibrated", [calibrated[0], ("nnDiffSeg_predict", [
            *predict, "-o", root / "uncalibrated", "-f", 0, "--save_probabilities", "--no_calibration"])], env)
        # then --calibrate: the temperature nnDiffSeg_calibrate would fit on fold 1's validation probabilities,
        # written (over the one above) and applied in the same command
        (model / CALIBRATION_FILE).write_text(json.dumps({"temperature": temperatures[1]}))
        result = _run_all(root, "fitted", [calibrated[1], ("nnDiffSeg_predict", [
            *predict, "-o", root / "fitted", "-f", 1, "--save_probabilities", "--calibrate"])], env)[1]
        temperature = json.loads((model / CALIBRATION_FILE).read_text())["temperature"]
    finally:
        (model / CALIBRATION_FILE).unlink(missing_ok=True)
    for case in raters["expected"]:
        own = np.load(root / "fold0" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(np.load(root / "uncalibrated" / f"{case}.npz")["probabilities"], own, atol=1e-6)
        for t in temperatures:
            np.testing.assert_allclose(np.load(root / f"calibrated_{t}" / f"{case}.npz")["probabilities"],
                                       scale_probabilities(own, t), atol=1e-5, err_msg=str(t))
            assert np.array_equal(np.array(Image.open(root / f"calibrated_{t}" / f"{case}.png")),
                                  np.array(Image.open(root / "fold0" / f"{case}.png")))

    assert f"temperature {temperature:.3f}" in result.stdout and "ECE" in result.stdout, result.stdout
    assert temperature != 1.0
    for case in raters["expected"]:
        own = np.load(root / "fold1" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(np.load(root / "fitted" / f"{case}.npz")["probabilities"],
                                   scale_probabilities(own, temperature), atol=1e-5)
