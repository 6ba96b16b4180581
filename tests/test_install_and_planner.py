"""Packaging (a normal, non-editable install) and the nnDiffSegPlanner, without training."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from cli import run_tool
from conftest import REPO_ROOT
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)


def test_normal_install_keeps_everything_inside_the_nndiffseg_package(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                       "__pycache__", "demo_output"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if p.name != "bin") == ["nndiffseg", "nndiffseg-0.1.0.dist-info"]
    code = ("import nndiffseg.trainers as t, nndiffseg.dataset_conversion.isic as c, nndiffseg.ext_trainer as e;"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find;"
            "print(t.__file__, c.__file__, e.EXT_TRAINER_DIR, sep='\\n');"
            "print(find('nnDiffSegTrainer') is t.nnDiffSegTrainer)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env["nnUNet_extTrainer"] = str(target / "nndiffseg" / "ext_trainer")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout.split()
    assert out[0] == str(target / "nndiffseg" / "trainers" / "__init__.py")
    assert out[1] == str(target / "nndiffseg" / "dataset_conversion" / "isic.py")
    assert out[2] == str(target / "nndiffseg" / "ext_trainer")
    assert out[-1] == "True"


@pytest.fixture(scope="module")
def toy_fingerprint(module_tmp):
    """A toy dataset of 96x128 images with its fingerprint, in this module's own nnU-Net folders."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    root = module_tmp("planner")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / name).mkdir()
            mp.setenv(name, str(root / name))
        write_toy_dataset(root / "nnUNet_raw", 21, num_train=6, num_test=0, height=96, width=128)
        extract_fingerprint_dataset(21, num_processes=1)
        yield root


def test_planner_rounds_2d_patches_up_to_the_latent_grid(toy_fingerprint):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nndiffseg.planning.planner import PATCH_MULTIPLE, nnDiffSegPlanner

    nnunet = ExperimentPlanner(21).plan_experiment()["configurations"]["2d"]
    ours = nnDiffSegPlanner(21).plan_experiment()["configurations"]["2d"]
    assert PATCH_MULTIPLE == 64
    assert list(nnunet["patch_size"]) == [96, 128]  # 96 = 2^5 * 3: nnU-Net alone leaves it off the latent grid
    assert list(ours["patch_size"]) == [128, 128]
    assert ours["architecture"]["arch_kwargs"]["n_stages"] == 6  # one more stage for the larger patch
    assert nnunet["architecture"]["arch_kwargs"]["n_stages"] == 5
    folder = Path(os.environ["nnUNet_preprocessed"]) / "Dataset021_Toy"
    assert load_json(folder / "nnDiffSegPlans.json")["plans_name"] == "nnDiffSegPlans"
    assert load_json(folder / "nnUNetPlans.json")["configurations"]["2d"]["patch_size"] == [96, 128]


def test_base_trainer_rejects_3d_configurations(toy_fingerprint):
    from nndiffseg.planning.planner import nnDiffSegPlanner
    from nndiffseg.trainers import nnDiffSegTrainer

    plans = nnDiffSegPlanner(21).plan_experiment()
    plans["continue_training"] = False  # nnU-Net >= 2.7 expects it when a trainer is built by hand
    plans["configurations"]["3d_fullres"] = {**plans["configurations"]["2d"], "patch_size": [8, 64, 64],
                                             "spacing": [1.0, 1.0, 1.0]}
    dataset_json = load_json(Path(os.environ["nnUNet_raw"]) / "Dataset021_Toy" / "dataset.json")
    from nndiffseg.errors import NnDiffSegError
    with pytest.raises(NnDiffSegError, match="supports 2D configurations only.*'3d_fullres'.*Train the '2d'"):
        nnDiffSegTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


@pytest.mark.parametrize("args, message", [
    (["-d", "555"], "Could not find a dataset with the ID 555"),
    (["-d", "21", "-pl", "NoSuchPlanner"], "experiment planner 'NoSuchPlanner' not found"),
])
def test_plan_and_preprocess_rejects_bad_arguments(toy_fingerprint, args, message):
    def snapshot():
        return {p: p.stat().st_mtime_ns for p in (toy_fingerprint / "nnUNet_preprocessed").rglob("*")}

    before = snapshot()
    result = run_tool("nnDiffSeg_plan_and_preprocess", *args, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert snapshot() == before
