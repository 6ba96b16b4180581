"""Issue 28, items 1 and 5: a kill or a stop signal while nnDiffSeg_plan_and_preprocess runs leaves the earlier
preprocessed data visible and whole, training refuses a preprocessed folder that lacks cases, and one Ctrl-C or
SIGTERM stops the tool within seconds, also when it lands inside a pool worker's result transfer (where a worker
that dies leaves the pool waiting for the rest of its message: the hang once seen with nnDiffSeg_demo).

Signals are sent at a hook marker, never after a guessed sleep: tests/site/sitecustomize.py pauses every spawn
pool worker inside its result transfer under nnDiffSeg_test_hook=pool_result_transfer:pause. In a re-run the
fingerprint exists, so the first pool is the preprocessing pool and its first result comes after one case was
written; with --clean the first is the fingerprint pool."""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import PLAN_QUICKLY, nnunet_folders, run_tool
from test_fault_injection import HOOK_ENV, start, stop_and_wait, tree_hashes, wait_for_marker
from toy_data import write_toy_dataset

from nndiffseg.errors import NnDiffSegError, Terminated

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

TOY = 45
CASES = 6
IN_TRANSFER = {HOOK_ENV: "pool_result_transfer:pause"}
# a stop signal must end the tool within seconds; this bound leaves room for a loaded machine, not for a hang
STOPPED_WITHIN_S = 30


@pytest.fixture(scope="module")
def planned(module_tmp):
    """A toy dataset planned and preprocessed once; each test works on a copy of its nnUNet_preprocessed."""
    root = module_tmp("preprocessing")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", TOY, num_train=CASES, num_test=0)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", TOY, *PLAN_QUICKLY, env=env)
    return {"root": root, "env": env, "name": raw.name}


def copy_of_preprocessed(planned, tmp_path) -> tuple[dict, Path]:
    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(planned["root"] / "nnUNet_preprocessed", preprocessed)
    return {**planned["env"], "nnUNet_preprocessed": str(preprocessed)}, preprocessed / planned["name"]


def stop_at_marker(env: dict, args: list, sig: signal.Signals) -> tuple[subprocess.CompletedProcess, float]:
    """nnDiffSeg_plan_and_preprocess -d TOY ARGS, sent ``sig`` (to its process group, as Ctrl-C or a cluster's
    time limit does) at the hook's marker; with the seconds it took to exit after the signal."""
    process = start("nnDiffSeg_plan_and_preprocess", "-d", TOY, *PLAN_QUICKLY, *args, env=env)
    try:
        wait_for_marker(process)
        stdout, stderr, seconds = stop_and_wait(process, sig)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess([], process.returncode, stdout, stderr), seconds


def assert_stopped(result: subprocess.CompletedProcess, seconds: float, code: int, line: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert seconds < STOPPED_WITHIN_S, seconds
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-3000:]


def test_sigkill_while_preprocessing_leaves_the_earlier_data(planned, tmp_path, monkeypatch):
    """SIGKILL after the first new case was written: the visible data is the earlier data, whole, and training
    takes it; only the killed run's hidden staging is left, for the next run to remove."""
    env, dataset = copy_of_preprocessed(planned, tmp_path)
    before = tree_hashes(dataset)
    stop_at_marker({**env, **IN_TRANSFER}, [], signal.SIGKILL)
    after = tree_hashes(dataset)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before
    assert ".nnDiffSegPlans_2d.staging/toy_Tr000.pkl" in after  # killed while writing the new data
    from nndiffseg.run.checks import check_preprocessed_data
    monkeypatch.setenv("nnUNet_preprocessed", env["nnUNet_preprocessed"])
    check_preprocessed_data(planned["name"], "nnDiffSegPlans", "2d")


def test_sigterm_inside_a_preprocessing_workers_result_transfer(planned, tmp_path):
    """SIGTERM, as a cluster's time limit sends it, while a worker sends its first result: exit 143 within
    seconds, the earlier data in place and nothing of the stopped run left."""
    env, dataset = copy_of_preprocessed(planned, tmp_path)
    before = tree_hashes(dataset)
    result, seconds = stop_at_marker({**env, **IN_TRANSFER}, [], signal.SIGTERM)
    assert_stopped(result, seconds, 143, "Terminated.")
    assert tree_hashes(dataset) == before


def test_ctrl_c_inside_a_fingerprint_workers_result_transfer(planned, tmp_path):
    """The hang of nnDiffSeg_demo: Ctrl-C while a fingerprint worker sends its result. One Ctrl-C ends the
    tool within seconds, and the earlier data stays."""
    env, dataset = copy_of_preprocessed(planned, tmp_path)
    data = tree_hashes(dataset / "nnDiffSegPlans_2d")
    result, seconds = stop_at_marker({**env, **IN_TRANSFER}, ["--clean"], signal.SIGINT)
    assert_stopped(result, seconds, 130, "Interrupted.")
    assert tree_hashes(dataset / "nnDiffSegPlans_2d") == data


# ---------------------------------------------------------------------------------------------- in-process

PLANS = {"configurations": {"2d": {"data_identifier": "nnDiffSegPlans_2d", "architecture": {}}}}


NEW = hashlib.sha256(b"new").hexdigest()


def write_cases(folder: Path, names, content: bytes = b"new") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for ending in (".b2nd", "_seg.b2nd", ".pkl"):
            (folder / f"{name}{ending}").write_bytes(content)


def preprocessed_dataset(root: Path, num_cases: int = 3, written: int = 3) -> Path:
    """A preprocessed dataset as nnU-Net lays it out (empty files: nothing is loaded), ``written`` of its
    ``num_cases`` cases in the 2d data folder."""
    dataset = root / "Dataset045_Toy"
    names = [f"toy_Tr{i:03d}" for i in range(num_cases)]
    (dataset / "gt_segmentations").mkdir(parents=True)
    for name in names:
        (dataset / "gt_segmentations" / f"{name}.png").write_bytes(b"label")
    (dataset / "dataset.json").write_text(json.dumps({"numTraining": num_cases, "file_ending": ".png"}))
    (dataset / "nnDiffSegPlans.json").write_text(json.dumps(PLANS))
    write_cases(dataset / "nnDiffSegPlans_2d", names[:written], b"earlier")
    return dataset


@pytest.mark.parametrize("fault", [None, RuntimeError, Terminated, "incomplete"])
def test_preprocessing_replaces_the_data_only_when_complete(tmp_path, monkeypatch, fault):
    """nnU-Net's preprocessing writes beside the earlier data (its plans name a staging folder), which is
    replaced only by complete new data; a failure, a stop signal or an incomplete result leaves the earlier data
    and nothing else."""
    from nndiffseg.planning import plan_and_preprocess

    dataset = preprocessed_dataset(tmp_path)
    before = tree_hashes(dataset)

    def preprocess_dataset(dataset_id, plans_identifier, configurations, num_processes):
        plans = json.loads((dataset / f"{plans_identifier}.json").read_text())
        staging = dataset / plans["configurations"]["2d"]["data_identifier"]
        assert staging.name.startswith(".") and tree_hashes(dataset / "nnDiffSegPlans_2d") == {
            k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("nnDiffSegPlans_2d/")}
        write_cases(staging, ["toy_Tr000", "toy_Tr001"] + ([] if fault == "incomplete" else ["toy_Tr002"]))
        if fault in (RuntimeError, Terminated):
            raise fault()

    monkeypatch.setattr(plan_and_preprocess.nnunet_paths, "nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setattr(plan_and_preprocess, "preprocess_dataset", preprocess_dataset)
    expected = NnDiffSegError if fault == "incomplete" else fault
    with pytest.raises(expected) if expected else contextlib.nullcontext() as raised:
        plan_and_preprocess._preprocess(TOY, dataset.name, PLANS, "nnDiffSegPlans", ["2d"], [1])
    if fault is None:
        after = tree_hashes(dataset)
        assert set(after) == set(before) and {after[k] for k in after if k.endswith(".pkl")} == {NEW}
    else:
        assert tree_hashes(dataset) == before
    if fault == "incomplete":
        assert "holds 2 of the 3 training cases of dataset.json (missing: toy_Tr002)" in str(raised.value)


@pytest.mark.parametrize("left, expected", [
    ({"nnDiffSegPlans_2d": "half", ".nnDiffSegPlans_2d.staging": "half", ".nnDiffSegPlans_2d.staging.json": ""},
     {"nnDiffSegPlans_2d": "half"}),  # staging of a killed run: removed (the folder itself is whole here)
    ({".nnDiffSegPlans_2d.replaced": "earlier"}, {"nnDiffSegPlans_2d": "earlier"}),  # killed between the renames
    ({"nnDiffSegPlans_2d": "new", ".nnDiffSegPlans_2d.replaced": "earlier"}, {"nnDiffSegPlans_2d": "new"}),
    ({"nnDiffSegPlans_2d": "half", ".nnDiffSegPlans_2d.previous": "earlier"},  # nndiffseg 0.1.0 preprocessed
     {"nnDiffSegPlans_2d": "earlier"}),                                        # in place
])
def test_the_next_run_clears_what_a_killed_run_left(tmp_path, left, expected):
    from nndiffseg.planning.plan_and_preprocess import _clear_killed_run

    for name, content in left.items():
        if name.endswith(".json"):
            (tmp_path / name).write_text("{}")
        else:
            write_cases(tmp_path / name, ["toy_Tr000"], content.encode())
    _clear_killed_run(tmp_path / "nnDiffSegPlans_2d")
    assert {p.name: (p / "toy_Tr000.pkl").read_text() for p in tmp_path.iterdir()} == expected


@pytest.mark.parametrize("written, data, problem", [
    (2, "nnDiffSegPlans_2d", "holds 2 of the 3 training cases of dataset.json (missing: toy_Tr002)"),
    (0, "nnDiffSegPlans_2d", "holds 0 of the 3 training cases"),  # nnU-Net: "Found more than one file ending"
    (3, None, "nnDiffSegPlans_2d does not exist"),  # a kill between the swap's renames
])
def test_training_refuses_incomplete_preprocessed_data(tmp_path, monkeypatch, written, data, problem):
    from nndiffseg.run.train import train

    dataset = preprocessed_dataset(tmp_path, written=written)
    if data is None:
        os.replace(dataset / "nnDiffSegPlans_2d", dataset / ".nnDiffSegPlans_2d.replaced")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    with pytest.raises(NnDiffSegError) as refused:
        train(dataset.name, "2d", "all", trainer_name="nnDiffSegTrainer", device="cpu")
    message = str(refused.value)
    assert problem in message and str(dataset / "nnDiffSegPlans_2d") in message, message
    assert message.endswith("repair it with: nnDiffSeg_plan_and_preprocess -d 45 -c 2d"), message
    assert not (tmp_path / "results").exists()


def test_sigterm_ends_a_tool_whose_cleanup_hangs():
    """SIGTERM is handled as Ctrl-C (the same cleanup, status 143), and a cleanup that hangs (a pool's
    shutdown) cannot hold the tool beyond STOP_DEADLINE_S after the signal."""
    script = ("import os, signal, time\n"
              "import nndiffseg.errors as errors\n"
              "errors.STOP_DEADLINE_S = 1.0\n"
              "def main():\n"
              "    try:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(60)\n"
              "    finally:\n"
              "        print('cleaning up', flush=True)\n"
              "        time.sleep(120)\n"
              "errors.run_cli(main)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 143 and result.stdout == "cleaning up\n", (result.returncode, result.stderr)


def test_a_fork_pools_workers_end_quietly_under_run_cli():
    """Forked workers inherit run_cli's handlers; Pool.terminate's SIGTERM must still end them silently, not
    as Terminated with a traceback each (the converters' fork pools)."""
    script = ("import multiprocessing, time\n"
              "from nndiffseg.errors import run_cli\n"
              "fork = multiprocessing.get_context('fork')\n"
              "started = fork.Event()\n"
              "def work():\n"
              "    started.set()\n"
              "    time.sleep(60)\n"
              "def main():\n"
              "    with fork.Pool(1) as pool:\n"
              "        pool.apply_async(work)\n"
              "        print(started.wait(60))\n"  # the worker is busy when leaving `with` terminates it
              "run_cli(main)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "True\n" and result.stderr == "", result.stderr
