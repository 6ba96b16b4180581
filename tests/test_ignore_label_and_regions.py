"""nnU-Net's ignore label with the diffusion trainers (it crashed guided training and, with 3 classes or more,
the latent head), and region-based datasets, which they refuse at train start."""
import json
import shutil

import numpy as np
import pytest
from cli import assert_refused, nnunet_folders, run_tool
from PIL import Image
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

IGNORE_ID, REGIONS_ID = 71, 72
SHORT = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 2]


def _relabel(folder, labels: dict, extra: dict | None = None) -> None:
    dataset_json = folder / "dataset.json"
    content = json.loads(dataset_json.read_text())
    content["labels"] = labels
    content.update(extra or {})
    dataset_json.write_text(json.dumps(content, indent=2))


@pytest.fixture(scope="module")
def ignore_dataset(module_tmp):
    """3 classes (discs 1 and 2 on background 0) with the top 8 rows of every training label unannotated (3)."""
    root = module_tmp("ignore")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", IGNORE_ID, num_train=10, num_test=1, num_classes=2)
    for f in (raw / "labelsTr").glob("*.png"):
        label = np.array(Image.open(f))
        label[:8] = 3
        Image.fromarray(label).save(f)
    _relabel(raw, {"background": 0, "class1": 1, "class2": 2, "ignore": 3})
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", IGNORE_ID, "-np", 1, "-npfp", 1, env=env)
    return {"root": root, "env": env, "raw": raw}


def _validation_summary(dataset, trainer) -> dict:
    folder = dataset["root"] / "nnUNet_results" / dataset["raw"].name / f"{trainer}__nnDiffSegPlans__2d" / "fold_0"
    return json.loads((folder / "validation" / "summary.json").read_text())


def test_guided_trainer_trains_and_validates_with_an_ignore_label(ignore_dataset):
    log = run_tool("nnDiffSeg_train", IGNORE_ID, "2d", 0, "-tr", "nnDiffSegTrainerGuided", *SHORT, "--clip_model",
                   "random", env=ignore_dataset["env"]).stdout
    assert "Pseudo dice" in log
    summary = _validation_summary(ignore_dataset, "nnDiffSegTrainerGuided")
    assert set(summary["mean"]) == {"1", "2"}  # two classes; the ignore label is none


def test_latent_trainer_trains_with_an_ignore_label_and_three_classes(ignore_dataset):
    """The ignore value (3) is no class of the mask autoencoder's 3 channels (it crashed here); the mask
    autoencoder stage's loss with an ignore label is tested on the head (tests/test_head_interface.py)."""
    log = run_tool("nnDiffSeg_train", IGNORE_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", *SHORT,
                   env=ignore_dataset["env"]).stdout
    assert "mask latents scaled" in log and "Pseudo dice" in log
    assert set(_validation_summary(ignore_dataset, "nnDiffSegTrainerLatent")["mean"]) == {"1", "2"}


def test_region_based_datasets_are_refused_at_train_start(ignore_dataset):
    """The ignore dataset's preprocessed data under another ID, its dataset.json made region-based (nnU-Net's
    planning does not look at the regions, so no second planning is needed)."""
    preprocessed = ignore_dataset["root"] / "nnUNet_preprocessed"
    source, name = preprocessed / ignore_dataset["raw"].name, f"Dataset{REGIONS_ID:03d}_Regions"
    shutil.copytree(source, preprocessed / name)
    plans_file = preprocessed / name / "nnDiffSegPlans.json"
    plans_file.write_text(plans_file.read_text().replace(ignore_dataset["raw"].name, name))
    _relabel(preprocessed / name, {"background": 0, "lesion": [1, 2], "core": 2}, {"regions_class_order": [1, 2]})
    result = run_tool("nnDiffSeg_train", REGIONS_ID, "2d", 0, "-tr", "nnDiffSegTrainerLatent", *SHORT,
                      env=ignore_dataset["env"], check=False)
    assert_refused(result, ["does not support region-based training", "train nnUNetTrainer"])
    fold = ignore_dataset["root"] / "nnUNet_results" / name / "nnDiffSegTrainerLatent__nnDiffSegPlans__2d" / "fold_0"
    assert not list(fold.glob("checkpoint*.pth"))
