"""nnDiffSeg_train's faults of issue 28 that need no trained model: a second run of a fold while one runs
(items 2), a --mask_vae or --prior trained for another dataset, labels or network (item 6), a 5-fold split of
fewer than 5 cases (item 7). One toy dataset of 4 cases is planned (not trained); the refusals run in one
process (tests/cli.py run_batch). The re-runs of a trained fold are refusal cases in test_fault_injection."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli import PLAN_QUICKLY, assert_refused, nnunet_folders, run_batch, run_tool
from test_fault_injection import tree_hashes
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

DATASET_ID = 46
SHORT = ["-device", "cpu", "--num_epochs", 1, "--iters_per_epoch", 1]
# a run the fix should refuse at once would otherwise train; none may run long
CASE_TIMEOUT = {"CLI_BATCH_CASE_TIMEOUT": "120"}
HOLD_LOCK = """
import sys, time
from pathlib import Path
from nndiffseg.run.fold_lock import fold_lock
with fold_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def small(module_tmp):
    root = module_tmp("faults_training")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", DATASET_ID, num_train=4, num_test=0)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", DATASET_ID, *PLAN_QUICKLY, env=env)
    return {"root": root, "env": env, "preprocessed": root / "nnUNet_preprocessed" / raw.name,
            "results": root / "nnUNet_results" / raw.name}


def checkpoint_of(preprocessed: Path, folder: Path, name: str, change=None) -> Path:
    """A checkpoint as nnU-Net writes it (init_args, trainer_name; no real weights) of this dataset's plans, or
    of a copy that ``change(plans, dataset_json)`` altered."""
    import torch
    plans = json.loads((preprocessed / "nnDiffSegPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    if change is not None:
        change(plans, dataset_json)
    path = folder / name
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "init_args": {
        "plans": plans, "configuration": "2d", "fold": 0, "dataset_json": dataset_json,
        "device": torch.device("cpu")}}, path)
    return path


def three_classes(plans: dict, dataset_json: dict) -> None:
    dataset_json["labels"] = {"background": 0, "class1": 1, "class2": 2}


def another_patch(plans: dict, dataset_json: dict) -> None:
    plans["configurations"]["2d"]["patch_size"] = [128, 128]


def another_dataset(plans: dict, dataset_json: dict) -> None:
    plans["dataset_name"] = "Dataset099_Elsewhere"


def refusal_cases(small: dict, pieces: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (nnDiffSeg_train's arguments, parts of the ERROR: line)."""
    latent = ["-tr", "nnDiffSegTrainerLatent"]
    guided = ["-tr", "nnDiffSegTrainerGuided", "--clip_model", "random"]
    return {
        # item 7: the split nnU-Net would make has 5 folds
        "four_cases": ([DATASET_ID, "2d", 0, "-tr", "nnDiffSegTrainer", *SHORT],
                       ["fold 0", "5-fold cross-validation needs at least 5 training cases", "has 4", "'all'"]),
        # item 2: another run holds the fold (the holder in `refused`)
        "fold_in_use": ([DATASET_ID, "2d", "all", "-tr", "nnDiffSegTrainer", *SHORT],
                        [str((small["results"] / "nnDiffSegTrainer__nnDiffSegPlans__2d" / "fold_all").resolve()),
                         "in use by another nnDiffSeg_train run", "(pid "]),
        # item 6: checkpoints of other labels or another network
        "mask_vae_three_classes": ([DATASET_ID, "2d", "all", *latent, *SHORT, "--mask_vae", pieces / "three.pth"],
                                   ["--mask_vae", "three.pth", "labels", "'class2': 2", "recorded", "here"]),
        "prior_another_patch": ([DATASET_ID, "2d", "all", *guided, *SHORT, "--prior", pieces / "patch.pth"],
                                ["--prior", "patch.pth", "patch size [128, 128] recorded"]),
        # item 6: another dataset with the same labels is warned of, not refused: the run is then refused by
        # item 7's check (fold 0), so that nothing trains
        "prior_another_dataset": ([DATASET_ID, "2d", 0, *guided, *SHORT, "--prior", pieces / "elsewhere.pth"],
                                  ["5-fold cross-validation"]),
    }


@pytest.fixture(scope="module")
def refused(small):
    pieces = small["root"] / "pieces"
    pieces.mkdir()
    for name, change in (("three.pth", three_classes), ("patch.pth", another_patch),
                         ("elsewhere.pth", another_dataset)):
        checkpoint_of(small["preprocessed"], pieces, name, change)
    cases = refusal_cases(small, pieces)
    held = Path(cases["fold_in_use"][1][0])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {f: tree_hashes(small["root"] / f) for f in ("nnUNet_preprocessed", "nnUNet_results")}
        results = run_batch(small["root"], "refusals", [("nnDiffSeg_train", args) for args, _ in cases.values()],
                            {**small["env"], **CASE_TIMEOUT})
        after = {f: tree_hashes(small["root"] / f) for f in before}
    finally:
        holder.kill()  # as a training killed by the user or the scheduler
        holder.wait(timeout=60)
    return dict(zip(cases, results)), cases, before, after, holder.pid, held


@pytest.mark.parametrize("name", ["four_cases", "fold_in_use", "mask_vae_three_classes", "prior_another_patch",
                                  "prior_another_dataset"])
def test_refused_with_one_error_line(refused, name):
    results, cases, *_ = refused
    assert_refused(results[name], cases[name][1])


def test_refusals_write_nothing(refused):
    """No fold folder, no split file: only the lock file of the run that holds fold_all."""
    _, _, before, after, _, held = refused
    assert after == before
    from nndiffseg.run.fold_lock import LOCK_FILE
    assert sorted(before["nnUNet_results"]) == sorted(
        str(p.relative_to(held.parents[2])) for p in [held.parents[1], held.parents[0], held, held / LOCK_FILE])


def test_the_second_run_of_a_fold_names_the_first_and_a_killed_one_blocks_nothing(refused):
    from nndiffseg.run.fold_lock import fold_lock

    results, _, _, _, holder_pid, held = refused
    assert f"(pid {holder_pid})" in results["fold_in_use"].stderr
    with fold_lock(held):  # the holder was killed: the kernel released its lock
        pass


def test_a_prior_from_another_dataset_is_named_in_one_warning(refused):
    stderr = refused[0]["prior_another_dataset"].stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1, stderr
    assert "elsewhere.pth" in warnings[0] and "Dataset099_Elsewhere" in warnings[0] and \
        f"Dataset{DATASET_ID:03d}_Toy" in warnings[0]


def test_matching_pieces_pass_silently_and_unrecorded_ones_are_named(small, tmp_path, monkeypatch, capsys):
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.run.checks import check_option_values
    from nndiffseg.trainers import nnDiffSegTrainerGuided, nnDiffSegTrainerLatent

    monkeypatch.setenv("nnUNet_preprocessed", str(small["root"] / "nnUNet_preprocessed"))
    dataset = small["preprocessed"].name
    same = checkpoint_of(small["preprocessed"], tmp_path, "same.pth")
    check_option_values(nnDiffSegTrainerGuided, {"prior": str(same)}, dataset, "nnDiffSegPlans", "2d")
    check_option_values(nnDiffSegTrainerLatent, {"mask_vae": str(same)}, dataset, "nnDiffSegPlans", "2d")
    assert capsys.readouterr().err == ""
    # a mask autoencoder does not depend on the U-Net's architecture, a prior does
    wider = checkpoint_of(small["preprocessed"], tmp_path, "wider.pth", lambda plans, _: plans["configurations"]["2d"]
                          ["architecture"]["arch_kwargs"].update(features_per_stage=[64] * 8))
    check_option_values(nnDiffSegTrainerLatent, {"mask_vae": str(wider)}, dataset, "nnDiffSegPlans", "2d")
    with pytest.raises(NnDiffSegError, match="--prior .*wider.pth does not fit this run: architecture "
                                             "features_per_stage \\[64, 64"):
        check_option_values(nnDiffSegTrainerGuided, {"prior": str(wider)}, dataset, "nnDiffSegPlans", "2d")
    import torch
    torch.save({"network_weights": {}}, tmp_path / "bare.pth")
    check_option_values(nnDiffSegTrainerGuided, {"prior": str(tmp_path / "bare.pth")}, dataset, "nnDiffSegPlans", "2d")
    assert "bare.pth records no nnU-Net dataset, plans or labels" in capsys.readouterr().err
