"""Run the command-line tools as a user would: in a fresh process, with the nnU-Net folders in the env."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent

MODULES = {
    "nnDiffSeg_plan_and_preprocess": "nndiffseg.planning.plan_and_preprocess",
    "nnDiffSeg_train": "nndiffseg.run.train",
    "nnDiffSeg_predict": "nndiffseg.inference.predict",
    "nnDiffSeg_evaluate": "nndiffseg.evaluation.evaluate",
    "nnDiffSeg_find_best_configuration": "nndiffseg.evaluation.find_best_configuration",
    "nnDiffSeg_ensemble": "nndiffseg.inference.ensemble",
    "nnDiffSeg_apply_postprocessing": "nndiffseg.inference.postprocessing",
    "nnDiffSeg_convert_isic": "nndiffseg.dataset_conversion.isic",
    "nnDiffSeg_convert_stroke2021": "nndiffseg.dataset_conversion.stroke2021",
    "nnDiffSeg_convert_multirater": "nndiffseg.dataset_conversion.multirater",
}

# planning options for datasets a test wrote itself: one worker each, and no nnU-Net integrity check (a spawned
# pool of its own; the default check is exercised by test_pipeline, test_ignore_label_and_regions and
# test_fault_injection)
PLAN_QUICKLY = ["-np", 1, "-npfp", 1, "--no_verify"]


def nnunet_folders(root: Path) -> dict:
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results below ``root``, as the env for run_tool;
    augmentation runs in the main process (nnUNet_n_proc_DA=0) and nnU-Net's final validation exports with one
    worker (nnUNet_def_n_proc=1): more worker processes would only add their start-up time and compete for the
    2 cores."""
    env = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        env[name] = str(root / name)
    return env


def planned_toy(root: Path, dataset_id: int, **toy) -> tuple[dict, Path]:
    """A toy dataset (``toy_data.write_toy_dataset``'s keywords) in nnU-Net folders of its own under ``root``, planned
    and preprocessed: (the environment for the tools, its raw folder)."""
    from toy_data import write_toy_dataset
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", dataset_id, **toy)
    run_tool("nnDiffSeg_plan_and_preprocess", "-d", dataset_id, *PLAN_QUICKLY, env=env)
    return env, raw


def run_tool(name: str, *args, env: dict | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Our tools run as ``python -m module`` (same code as the console scripts); others (nnUNetv2_*) by
    their console script beside this interpreter."""
    cmd = [sys.executable, "-m", MODULES[name]] if name in MODULES else [str(BIN / name)]
    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    result = subprocess.run(cmd + [str(a) for a in args], env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    _log_wall_time(name, args, time.perf_counter() - start)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-5000:]}")
    return result


def _log_wall_time(name: str, args, seconds: float) -> None:
    """With NNDIFFSEG_TEST_TOOL_LOG=FILE, one line per tool process the tests start (to find where suite time goes)."""
    if log := os.environ.get("NNDIFFSEG_TEST_TOOL_LOG"):
        with open(log, "a") as f:
            f.write(f"{seconds:7.1f} s  {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}  {name} "
                    f"{' '.join(map(str, args))[:160]}\n")


def assert_refused(result: subprocess.CompletedProcess, expected: list[str]) -> None:
    """A tool refused its input: exit 1, no traceback, and a last stderr line ERROR: ... holding every part."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ERROR: "), result.stderr
    for part in expected:
        assert part in error, (part, error)


def run_batch(root: Path, name: str, commands: list[tuple[str, list]], env: dict) -> list:
    """The commands run one after the other in one process (tests/cli_batch.py): one start-up of torch and
    nnU-Net for all of them (10-15 s each on the 2-core machine). For refusals, and for runs that share ``env``'s
    nnU-Net folders (nnU-Net reads them once, at import); a test of a tool's own process (its exit, signals, its
    start-up) uses run_tool."""
    (root / f"{name}.json").write_text(json.dumps([{"tool": t, "args": list(map(str, a))} for t, a in commands]))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "cli_batch.py"), str(root / f"{name}.json"),
                    str(root / f"{name}_results.json")], env={**os.environ, **env}, check=True, timeout=600)
    _log_wall_time(f"batch {name}", [t for t, _ in commands], time.perf_counter() - start)
    return [subprocess.CompletedProcess([], r["returncode"], r["stdout"], r["stderr"])
            for r in json.loads((root / f"{name}_results.json").read_text())]
