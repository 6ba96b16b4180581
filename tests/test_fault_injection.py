"""Every nnDiffSeg_ command fed the bad input and faults a new user meets (issue 14): each must exit non-zero
with one ERROR: line naming the file or option, print no traceback, leave nothing behind and leave the source
and any earlier results untouched. Kills are sent at a known point (nnDiffSeg_test_hook), never after a guessed
sleep.

One toy dataset is planned and trained once (nnDiffSegTrainer, one epoch of one iteration); the refusals run
in one process (tests/cli_batch.py), the kills and the resumed run in their own."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli import MODULES, assert_refused, nnunet_folders, run_batch
from PIL import Image
from toy_data import write_toy_dataset

from nndiffseg.test_seam import HOOK_ENV, MARKER, reached

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

TOY, LABELS_0_2, ORPHAN_LABEL, BAD_JSON = 41, 42, 43, 44
TRAINER = "nnDiffSegTrainer"
MODEL = f"{TRAINER}__nnDiffSegPlans__2d"
SHORT_RUN = ["-device", "cpu", "--num_epochs", "1", "--iters_per_epoch", "1"]
RERUN_FINISHED = [f"{MODEL}/fold_0 holds a finished training", "checkpoint_final.pth", "--c", "--overwrite"]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its checksum, and every folder (an empty one left behind counts)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return hashes


def write_broken_datasets(raw: Path) -> None:
    """Labels {0, 2} (not consecutive); a label whose image is missing; a dataset.json that is not JSON."""
    folder = write_toy_dataset(raw, LABELS_0_2, num_train=5, num_test=0)
    for label_file in (folder / "labelsTr").iterdir():
        label = np.array(Image.open(label_file))
        Image.fromarray((label * 2).astype(np.uint8)).save(label_file)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 2}
    (folder / "dataset.json").write_text(json.dumps(meta))

    folder = write_toy_dataset(raw, ORPHAN_LABEL, num_train=5, num_test=0)
    (folder / "imagesTr" / "toy_Tr004_0000.png").unlink()
    meta = json.loads((folder / "dataset.json").read_text())
    meta["numTraining"] = 4  # nnU-Net's own count then agrees, and the label would be dropped silently
    (folder / "dataset.json").write_text(json.dumps(meta))

    folder = raw / f"Dataset{BAD_JSON:03d}_BadJson"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text('{"labels": {"background": 0,')


@pytest.fixture(scope="module")
def toy(module_tmp):
    root = module_tmp("faults")
    env = nnunet_folders(root)
    raw = write_toy_dataset(root / "nnUNet_raw", TOY, num_train=6, num_test=4)
    ran = run_batch(root, "prepare", [("nnDiffSeg_plan_and_preprocess", ["-d", TOY, "-np", 1, "-npfp", 1]),
                                      ("nnDiffSeg_train", [TOY, "2d", 0, "-tr", TRAINER, *SHORT_RUN])], env)
    assert all(r.returncode == 0 for r in ran), [r.stderr[-3000:] for r in ran]
    write_broken_datasets(root / "nnUNet_raw")
    return {"root": root, "env": env, "raw": raw, "fold": root / "nnUNet_results" / raw.name / MODEL / "fold_0"}


# ---------------------------------------------------------------------------------------------- refusals

def refusal_cases(root: Path, raw: Path) -> dict[str, tuple[str, list, list[str]]]:
    """name -> (tool, arguments, parts of the ERROR: line). Files they need are made by refusals_setup."""
    bad = root / "bad"
    trained = root / "nnUNet_results" / raw.name / MODEL / "fold_0"
    fold_args = [TOY, "2d", 1, "-device", "cpu"]
    predict = ["-i", raw / "imagesTs", "-d", TOY, "-c", "2d", "-tr", TRAINER, "-device", "cpu", "-f", 0]
    return {
        # item 2: checked before the existing preprocessed data is touched
        "plan_np_0": ("nnDiffSeg_plan_and_preprocess", ["-d", TOY, "-np", 0], ["-np", "0"]),
        "plan_npfp_0": ("nnDiffSeg_plan_and_preprocess", ["-d", TOY, "-npfp", 0], ["-npfp"]),
        # item 7: broken datasets and a configuration name in the wrong case
        "plan_config_case": ("nnDiffSeg_plan_and_preprocess", ["-d", TOY, "-c", "2D"], ["-c 2D", "unknown"]),
        "plan_labels_0_2": ("nnDiffSeg_plan_and_preprocess", ["-d", LABELS_0_2, "-np", 1, "-npfp", 1],
                            ["consecutive"]),
        "plan_orphan_label": ("nnDiffSeg_plan_and_preprocess", ["-d", ORPHAN_LABEL], ["toy_Tr004.png", "no image"]),
        # item 8: dataset.json that is not JSON
        "plan_bad_json": ("nnDiffSeg_plan_and_preprocess", ["-d", BAD_JSON], ["dataset.json", "not valid JSON"]),
        # item 9: folds
        "train_fold_7": ("nnDiffSeg_train", [TOY, "2d", 7, "-device", "cpu"], ["fold 7", "splits_final.json"]),
        "train_fold_abc": ("nnDiffSeg_train", [TOY, "2d", "abc", "-device", "cpu"], ["'abc'"]),
        "train_missing_sd_weights": ("nnDiffSeg_train", [*fold_args, "-tr", "nnDiffSegTrainerLatent", "--sd_weights",
                                                         bad / "no_such_sd"], ["--sd_weights", "no such local folder"]),
        # item 4: corrupt checkpoints given to --prior, --mask_vae, -chk
        "train_corrupt_prior": ("nnDiffSeg_train", [*fold_args, "-tr", "nnDiffSegTrainerGuided", "--clip_model",
                                                    "random", "--prior", bad / "empty.pth"],
                                ["--prior", "empty.pth", "truncated or corrupt"]),
        "train_corrupt_mask_vae": ("nnDiffSeg_train", [*fold_args, "-tr", "nnDiffSegTrainerLatent", "--mask_vae",
                                                       bad / "garbage.pth"], ["--mask_vae", "garbage.pth"]),
        "predict_corrupt_chk": ("nnDiffSeg_predict", [*predict, "-o", bad / "pred_chk", "-chk",
                                                      "checkpoint_truncated.pth"],
                                ["checkpoint_truncated.pth", "truncated or corrupt"]),
        # item 4: --c where no checkpoint can be read
        "train_continue_unreadable": ("nnDiffSeg_train", [TOY, "2d", 0, "-device", "cpu", "-tr",
                                                          "nnDiffSegTrainerGuided", "--c"],
                                      ["--c", "no readable checkpoint", "checkpoint_final.pth", "checkpoint_best.pth"]),
        # item 10: a run that fails its checks after the trainer was built leaves no fold folder or log
        "train_corrupt_pretrained": ("nnDiffSeg_train", [*fold_args, "-tr", TRAINER, "-pretrained_weights",
                                                         bad / "empty.pth"], ["-pretrained_weights", "empty.pth"]),
        "train_continue_changed_option": ("nnDiffSeg_train", [TOY, "2d", 0, "-device", "cpu", "-tr", TRAINER,
                                                              "--c", "--seed", 3],
                                          ["--c resumes with the options", "--seed 3"]),
        # issue 28 item 2: a new run (pretrained weights too) where a finished or interrupted one is (fold 3: made
        # by `refusals`); with --overwrite, one refused after its trainer was built leaves the model and its record
        "train_rerun_finished": ("nnDiffSeg_train", [TOY, "2d", 0, "-tr", TRAINER, *SHORT_RUN], RERUN_FINISHED),
        "train_rerun_pretrained": ("nnDiffSeg_train", [TOY, "2d", 0, "-tr", TRAINER, *SHORT_RUN, "-pretrained_weights",
                                                       trained / "checkpoint_final.pth"], RERUN_FINISHED),
        "train_rerun_interrupted": ("nnDiffSeg_train", [TOY, "2d", 3, "-tr", TRAINER, *SHORT_RUN],
                                    [f"{MODEL}/fold_3 holds an interrupted training (checkpoint_latest.pth)", "--c",
                                     "--overwrite"]),
        "train_overwrite_refused": ("nnDiffSeg_train", [TOY, "2d", 0, "-tr", TRAINER, *SHORT_RUN, "--overwrite",
                                                        "--seed", 9, "-pretrained_weights", bad / "empty.pth"],
                                    ["-pretrained_weights", "empty.pth"]),
        # item 10: options checked before any work
        "train_clip_model": ("nnDiffSeg_train", [*fold_args, "-tr", "nnDiffSegTrainerGuided", "--clip_model",
                                                 "NoSuchModel:openai"], ["NoSuchModel"]),
        "train_prompts": ("nnDiffSeg_train", [*fold_args, "-tr", "nnDiffSegTrainerGuided", "--clip_model", "random",
                                              "--prompts", bad / "no_prompts.json"], ["no_prompts.json"]),
        "train_num_epochs_0": ("nnDiffSeg_train", [*fold_args, "-tr", TRAINER, "--num_epochs", 0], ["--num_epochs"]),
        "predict_step_size": ("nnDiffSeg_predict", [*predict, "-o", bad / "pred_step", "-step_size", 0],
                              ["-step_size"]),
        # item 8: a 3d configuration for the MaskVAE trainer, -o that is a file
        "train_mask_vae_3d": ("nnDiffSeg_train", [TOY, "3d_fullres", 1, "-device", "cpu", "-tr",
                                                  "nnDiffSegTrainerMaskVAE"], ["3d_fullres"]),
        "predict_output_file": ("nnDiffSeg_predict", [*predict, "-o", bad / "a_file"], ["a_file", "is a file"]),
        # issue 28 item 3: --continue_prediction into predictions that no record explains
        "predict_continue_unrecorded": ("nnDiffSeg_predict", [*predict, "-o", bad / "unrecorded",
                                                              "--continue_prediction"],
                                        ["unrecorded", "toy_Ts000.png", "no nndiffseg_predict_args.json"]),
        "evaluate_output_below_file": ("nnDiffSeg_evaluate", ["-ref", raw / "labelsTs", "-pred", bad / "stray",
                                                              "-o", bad / "a_file" / "summary.json"],
                                       ["a_file", "is a file"]),
        # item 5: a stray label in a prediction
        "evaluate_stray_label": ("nnDiffSeg_evaluate", ["-ref", raw / "labelsTs", "-pred", bad / "stray", "-np", 1],
                                 ["toy_Ts001", "label 5", "dataset.json"]),
        # the converters (they held up): a missing release, a bad -np
        "convert_isic_missing_source": ("nnDiffSeg_convert_isic", ["-i", bad / "no_release", "-d", 50],
                                        ["no_release"]),
        "convert_stroke2021_np_0": ("nnDiffSeg_convert_stroke2021", ["-i", bad / "no_release", "-d", 51, "-np", 0],
                                    ["-np"]),
        # item 1 and 10: the demo checks everything before it writes or removes anything
        "demo_typo_overwrite": ("nnDiffSeg_demo", ["-o", bad / "earlier_demo", "--overwrite", "-tr",
                                                   "nnDiffSegTrainerTypo"], ["nnDiffSegTrainerTypo"]),
        "demo_user_folder": ("nnDiffSeg_demo", ["-o", bad / "user_folder", "--overwrite"],
                             ["user_folder", "not written by nnDiffSeg_demo"]),
        "demo_num_epochs_0": ("nnDiffSeg_demo", ["-o", bad / "new_demo", "--num_epochs", 0], ["--num_epochs"]),
    }


def refusals_setup(root: Path, raw: Path, fold: Path) -> None:
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.pth").write_bytes(b"")
    (bad / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (bad / "a_file").write_text("a file, not a folder")
    (bad / "user_folder").mkdir()
    (bad / "user_folder" / "thesis.txt").write_text("a user's own work")
    (bad / "earlier_demo").mkdir()
    (bad / "earlier_demo" / ".nndiffseg_demo").write_text("")
    (bad / "earlier_demo" / "predictions").mkdir()
    truncated = (fold / "checkpoint_final.pth").read_bytes()
    (fold / "checkpoint_truncated.pth").write_bytes(truncated[:len(truncated) // 2])
    (bad / "unrecorded").mkdir()
    shutil.copy(raw / "labelsTs" / "toy_Ts000.png", bad / "unrecorded")
    (bad / "stray").mkdir()
    for label_file in sorted((raw / "labelsTs").iterdir()):
        shutil.copy(label_file, bad / "stray" / label_file.name)
    stray = bad / "stray" / "toy_Ts001.png"
    label = np.array(Image.open(stray))
    label[:4, :4] = 5
    Image.fromarray(label).save(stray)


@pytest.fixture(scope="module")
def refusals(toy):
    """Every refusal case, run in one process; with the trees before and after."""
    root, raw = toy["root"], toy["raw"]
    refusals_setup(root, raw, toy["fold"])
    cases = refusal_cases(root, raw)
    watched = [root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results", root / "bad"]
    before = {str(w): tree_hashes(w) for w in watched}
    unreadable = root / "nnUNet_results" / raw.name / "nnDiffSegTrainerGuided__nnDiffSegPlans__2d" / "fold_0"
    unreadable.mkdir(parents=True)  # an earlier run's fold folder, made after the snapshot of the results
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        (unreadable / name).write_bytes(b"")
    shutil.copytree(raw / "imagesTs", root / "outside" / "images")
    (root / "outside" / "images" / "toy_corrupt_0000.png").write_bytes(b"\x89PNG truncated")
    shutil.copy(raw / "imagesTs" / "toy_Ts000_0000.png", root / "outside" / "images" / "toy_Ts000_0000.jpg")
    # --c where checkpoint_final is truncated and an earlier run was killed while writing a checkpoint: a copy
    # of the trained fold as fold 2, made after the snapshot and removed before the second one
    resumed = toy["fold"].with_name("fold_2")
    shutil.copytree(toy["fold"], resumed)
    (resumed / "checkpoint_final.pth").write_bytes((resumed / "checkpoint_final.pth").read_bytes()[:1000])
    (resumed / ".partial_checkpoint_latest.pth").write_bytes(b"a write that was killed")
    interrupted = toy["fold"].with_name("fold_3")  # a run killed before its end: checkpoint_latest only
    interrupted.mkdir()
    shutil.copy(toy["fold"] / "checkpoint_final.pth", interrupted / "checkpoint_latest.pth")
    predicted = faulty_case(root, raw)
    # issue 28 item 3: that prediction continued with another checkpoint, with other settings
    continued = [*predicted[1], "--continue_prediction"]
    extra = {"predict_corrupt_case": predicted,
             "predict_continue_other_checkpoint": (predicted[0], [*continued, "-chk", "checkpoint_best.pth"]),
             "predict_continue_other_settings": (predicted[0], [*continued, "--save_probabilities", "--disable_tta",
                                                                "-step_size", 0.25]),
             "train_continue_fallback": ("nnDiffSeg_train", [TOY, "2d", 2, "-tr", TRAINER, "-device", "cpu", "--c"])}
    results = run_batch(root, "refusals", [(tool, args) for tool, args, _ in cases.values()] + list(extra.values()),
                        toy["env"])
    cases.update({name: (*case, None) for name, case in extra.items()})
    assert sorted(p.name for p in unreadable.iterdir()) == ["checkpoint_best.pth", "checkpoint_final.pth"]
    shutil.rmtree(unreadable.parent)
    import torch
    resumed_files = sorted(p.name for p in resumed.iterdir())
    resumed_epoch = torch.load(resumed / "checkpoint_final.pth", weights_only=False)["current_epoch"]
    shutil.rmtree(resumed)
    assert sorted(p.name for p in interrupted.iterdir()) == ["checkpoint_latest.pth"]
    shutil.rmtree(interrupted)
    after = {str(w): tree_hashes(w) for w in watched}
    (toy["fold"] / "checkpoint_truncated.pth").unlink()
    results = dict(zip(cases, results))
    results["train_continue_fallback"].files, results["train_continue_fallback"].epoch = resumed_files, resumed_epoch
    return results, cases, before, after


def faulty_case(root: Path, raw: Path) -> tuple[str, list]:
    """Item 11: a prediction where one case is corrupt; the others are predicted, the error goes to stderr."""
    return ("nnDiffSeg_predict", ["-i", root / "outside" / "images", "-o", root / "outside" / "pred", "-d", TOY,
                                  "-c", "2d", "-tr", TRAINER, "-device", "cpu", "-f", 0, "-nps", 0])


@pytest.mark.parametrize("name", list(refusal_cases(Path("/"), Path("/"))))
def test_refused_with_one_error_line(refusals, name):
    results, cases, _, _ = refusals
    assert_refused(results[name], cases[name][2])


def test_predict_reports_a_failed_case_on_stderr(refusals):
    result = refusals[0]["predict_corrupt_case"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ERROR: case toy_corrupt failed" in result.stderr and "toy_corrupt_0000.png" in result.stderr
    assert "toy_corrupt" not in result.stdout
    assert "Predicted 4 case(s)" in result.stdout


def test_predict_names_input_files_with_another_ending(refusals):
    """Issue 28 item 7: a .jpg among .png inputs was skipped silently."""
    stderr = refusals[0]["predict_corrupt_case"].stderr
    assert "WARNING: 1 file(s)" in stderr and "toy_Ts000_0000.jpg" in stderr and ".png" in stderr, stderr


def test_continue_prediction_refuses_other_settings(refusals, toy):
    """Issue 28 item 3: continuing predict_corrupt_case's folder with another checkpoint or other settings kept its
    outputs, added the new run's and rewrote the record to name only the new run (with --save_probabilities: no
    .npz for the skipped cases, but a record claiming them). Refused, each difference named, nothing written."""
    results = refusals[0]
    assert_refused(results["predict_continue_other_checkpoint"],
                   ["checkpoint_name: recorded checkpoint_final.pth, now checkpoint_best.pth"])
    assert_refused(results["predict_continue_other_settings"],
                   ["use_tta: recorded true, now false", "tile_step_size: recorded 0.5, now 0.25",
                    "save_probabilities: recorded false, now true"])
    assert "checkpoint_name" not in results["predict_continue_other_settings"].stderr
    out = toy["root"] / "outside" / "pred"
    record = json.loads((out / "nndiffseg_predict_args.json").read_text())
    assert record["checkpoint_name"] == "checkpoint_final.pth" and record["save_probabilities"] is False
    assert not list(out.glob("*.npz"))


def test_continue_falls_back_from_an_unreadable_checkpoint(refusals):
    """--c finds checkpoint_final truncated, says so, continues from checkpoint_best (saved after epoch 0) and
    removes the partial file of a killed checkpoint write."""
    result = refusals[0]["train_continue_fallback"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint_final.pth: not a readable checkpoint" in result.stderr
    assert "continuing from" in result.stderr and "checkpoint_best.pth" in result.stderr
    assert not [name for name in result.files if name.startswith(".partial_")]
    assert result.epoch == 1


def test_refusals_leave_everything_as_it_was(refusals):
    """The source data, the earlier preprocessed data and model, and the user's files are untouched, and no
    run left a folder (fold folders, preprocessed datasets, demo output) behind."""
    _, _, before, after = refusals
    for folder in before:
        changed = [k for k in before[folder] if after[folder].get(k) != before[folder][k]]
        assert after[folder] == before[folder], (folder, set(after[folder]) ^ set(before[folder]), changed)


# ---------------------------------------------------------------------------------------------- kills

def _as_a_shell_starts_it() -> None:
    """Ctrl-C handled by default and not blocked in the child, as a terminal's shell starts a tool. A child
    inherits both from the test process, which earlier tests in the same pytest worker may have left ignoring
    or blocking SIGINT (both Ctrl-C tests failed in the full suite only, never alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start(tool: str, *args, env: dict) -> subprocess.Popen:
    """A tool in its own process group, so a signal reaches its workers too, as Ctrl-C in a terminal does."""
    return subprocess.Popen([sys.executable, "-m", MODULES[tool], *map(str, args)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_a_shell_starts_it)


def wait_for_marker(process: subprocess.Popen, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if line.startswith(MARKER):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"exited {process.wait()} before the hook:\n{''.join(lines)}\n{process.stderr.read()}")


def stop_and_wait(process: subprocess.Popen, sig: signal.Signals, timeout: float = 60) -> tuple[str, str, float]:
    """Send ``sig`` to the tool's process group; its remaining stdout, its stderr and the seconds it took to exit.
    A tool still running after ``timeout`` fails the test with every thread's stack (run_cli's SIGUSR1 handler)."""
    os.killpg(process.pid, sig)
    sent = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)
        stacks = process.communicate()[1][-6000:]
        raise AssertionError(f"no exit {timeout} s after {sig.name}; its stacks:\n{stacks}") from None
    return stdout, stderr, time.monotonic() - sent


def test_ctrl_c_stops_prediction_promptly_and_cleanly(toy, tmp_path):
    out = tmp_path / "pred"
    process = start("nnDiffSeg_predict", "-i", toy["raw"] / "imagesTs", "-o", out, "-d", TOY, "-c", "2d", "-tr",
                    TRAINER, "-f", 0, "-device", "cpu", "-nps", 2,
                    env={**toy["env"], HOOK_ENV: "case_exported:pause"})
    try:
        wait_for_marker(process)
        _, stderr, elapsed = stop_and_wait(process, signal.SIGINT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert elapsed < 10, elapsed
    assert "Traceback" not in stderr, stderr
    # the finished case stays for --continue_prediction, beside the run's record; no .partial_ file
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "nndiffseg_predict_args.json", "plans.json",
                                                     "toy_Ts000.png"]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(toy, tmp_path):
    """SIGKILL between writing a checkpoint and renaming it (right after nnU-Net's "New best EMA pseudo Dice")
    leaves the previous checkpoints whole; the killed write is a .partial_ file, which the next run removes
    (test_continue_falls_back_from_an_unreadable_checkpoint)."""
    results = tmp_path / "nnUNet_results"
    shutil.copytree(toy["root"] / "nnUNet_results", results)
    fold = results / toy["raw"].name / MODEL / "fold_0"
    before = tree_hashes(fold)
    process = start("nnDiffSeg_train", TOY, "2d", 0, "-tr", TRAINER, "-device", "cpu", "--c", "--num_epochs", 2,
                    env={**toy["env"], "nnUNet_results": str(results), HOOK_ENV: "checkpoint_written:pause"})
    try:
        wait_for_marker(process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    written = tree_hashes(fold)
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        assert written[name] == before[name]
    assert len(list(fold.glob(".partial_checkpoint_*.pth"))) == 1, sorted(written)


def test_overwrite_trains_again_and_holds_the_fold_while_it_runs(toy, tmp_path):
    """--overwrite on the trained fold: once the new run has passed its checks the earlier checkpoints and
    validation go (a kill from then on leaves only the new run's, for --c); while it runs, a second run of the
    fold is refused naming its pid (issue 28 item 2); killed, it blocks no later run."""
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.run.fold_lock import fold_lock

    results = tmp_path / "nnUNet_results"
    shutil.copytree(toy["root"] / "nnUNet_results", results)
    fold = results / toy["raw"].name / MODEL / "fold_0"
    process = start("nnDiffSeg_train", TOY, "2d", 0, "-tr", TRAINER, *SHORT_RUN, "--overwrite",
                    env={**toy["env"], "nnUNet_results": str(results), HOOK_ENV: "checkpoint_written:pause"})
    try:
        printed = "".join(wait_for_marker(process))
        files = sorted(p.name for p in fold.iterdir())
        with pytest.raises(NnDiffSegError, match=f"in use by another nnDiffSeg_train run \\(pid {process.pid}\\)"):
            with fold_lock(fold):
                pass
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "--overwrite: removed the earlier run's checkpoint_final.pth, checkpoint_best.pth, validation" in printed
    assert ".partial_checkpoint_best.pth" in files  # the new run's first checkpoint, being written
    assert not [name for name in files if name.startswith("checkpoint_") or name == "validation"], files
    with fold_lock(fold):
        pass


# ---------------------------------------------------------------------------------------------- in-process faults

@pytest.mark.parametrize("error, parts", [
    (OSError(28, "No space left on device", "/data/nnUNet_preprocessed/x.npz"),
     ["No space left on device", "/data/nnUNet_preprocessed/x.npz"]),
    (NotADirectoryError(20, "Not a directory", "/data/nnUNet_raw"), ["Not a directory", "/data/nnUNet_raw"]),
    (json.JSONDecodeError("Expecting value", "{", 1), ["invalid JSON", "Expecting value"]),
    (AssertionError("Labels must be in consecutive order (0, 1, 2, ...)"), ["AssertionError", "consecutive"]),
    (RuntimeError("Some segmentation images contained unexpected labels"), ["unexpected labels"]),
])
def test_run_cli_turns_faults_into_one_error_line(error, parts, capsys, monkeypatch):
    from nndiffseg.errors import run_cli

    def main():
        raise error

    monkeypatch.delenv("nnDiffSeg_debug", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    stderr = capsys.readouterr().err
    assert_refused(subprocess.CompletedProcess([], exit_info.value.code, "", stderr), parts)
    assert len(stderr.strip().splitlines()) == 1
    monkeypatch.setenv("nnDiffSeg_debug", "1")  # keeps the traceback for a bug report
    with pytest.raises(SystemExit):
        run_cli(main)
    assert "Traceback" in capsys.readouterr().err


def test_nnunet_folder_that_is_a_file(tmp_path, monkeypatch):
    from nndiffseg.dataset_conversion.common import nnunet_raw_folder
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.utils import check_nnunet_paths

    (tmp_path / "raw").write_text("")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(NnDiffSegError, match="nnUNet_raw=.*raw is a file"):
        check_nnunet_paths("nnUNet_raw")
    with pytest.raises(NnDiffSegError, match="nnUNet_raw=.*raw is a file"):
        nnunet_raw_folder()


@pytest.mark.parametrize("fails_at", [".npz", ".png"])
def test_disk_full_while_exporting_leaves_no_partial_file(tmp_path, monkeypatch, fails_at):
    from nnunetv2.inference import export_prediction

    from nndiffseg.inference.prediction_folder import export_label_map

    def export(logits, properties, configuration_manager, plans_manager, dataset_json, output, save_probabilities):
        for ending in (".npz", ".pkl", ".png"):
            Path(output + ending).write_bytes(b"half")
            if ending == fails_at:
                raise OSError(28, "No space left on device", output + ending)

    monkeypatch.setattr(export_prediction, "export_prediction_from_logits", export)
    with pytest.raises(OSError):
        export_label_map(None, {}, None, None, {"file_ending": ".png"}, str(tmp_path), "case", True)
    assert list(tmp_path.iterdir()) == []


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    from nndiffseg.files import write_atomically

    target = tmp_path / "checkpoint_best.pth"
    target.write_bytes(b"previous")

    def write(name):
        Path(name).write_bytes(b"trunc")
        raise OSError(28, "No space left on device", name)

    with pytest.raises(OSError):
        write_atomically(str(target), write)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.pth"] and target.read_bytes() == b"previous"
    write_atomically(str(target), lambda name: Path(name).write_bytes(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.pth"] and target.read_bytes() == b"new"


def test_training_explains_an_empty_validation_set(tmp_path, monkeypatch):
    from nndiffseg.errors import NnDiffSegError
    from nndiffseg.run.checks import check_fold

    (tmp_path / "Dataset027_Stroke2021").mkdir()
    (tmp_path / "Dataset027_Stroke2021" / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"],
                                                                                         "val": []}]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    with pytest.raises(NnDiffSegError, match="fold 0 .* has no validation cases.*--split nnunet"):
        check_fold("Dataset027_Stroke2021", 0)
    with pytest.raises(NnDiffSegError, match="fold 1 does not exist.*fold\\(s\\) 0-0"):
        check_fold("Dataset027_Stroke2021", 1)
    check_fold("Dataset027_Stroke2021", "all")


def test_small_stroke2021_release_warns_of_empty_split_parts(nnunet_env, tmp_path, capsys):
    from nndiffseg.dataset_conversion.stroke2021 import convert_stroke2021
    from nndiffseg.dataset_conversion.stroke2021_fixture import write_stroke2021_fixture

    fixture = write_stroke2021_fixture(tmp_path / "src", "sdmcseg", num_ischemic=4, num_hemorrhagic=3,
                                       num_nonstroke=0, size=32)
    dataset = convert_stroke2021(fixture.source, 27, num_processes=1)
    out = capsys.readouterr().out
    assert "WARNING: ischemic: 4 slices give no validation slice" in out
    assert "WARNING: fold 0 of splits_final.json has no validation slices" in out
    assert json.loads((dataset / "splits_final.json").read_text())[0]["val"] == []


def test_isic_names_skipped_files_and_cleans_a_killed_run(nnunet_env, tmp_path, capsys):
    from test_convert_isic import add_clutter, make_2017

    from nndiffseg.dataset_conversion.isic import convert_isic

    src = make_2017(tmp_path / "isic")
    add_clutter(src / "ISIC-2017_Training_Data", "ISIC_0000001")
    raw = nnunet_env["nnUNet_raw"]
    killed = raw / ".Dataset017_ISIC2017.partial-999999999-abc"  # no such process: a killed conversion's stage
    (killed / "imagesTr").mkdir(parents=True)
    old_umask = os.umask(0o022)
    try:
        dataset = convert_isic(src, 17, num_processes=1)
    finally:
        os.umask(old_umask)
    out = capsys.readouterr().out
    for name in ("LICENSE.txt", "ATTRIBUTION.txt", ".DS_Store", "ISIC-2017_Training_Data_metadata.csv"):
        assert f"ISIC-2017_Training_Data/{name}: " in out
    assert ".DS_Store: hidden file" in out and "1 more (superpixels" in out
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset017_ISIC2017"]
    assert dataset.stat().st_mode & 0o777 == 0o755  # the user's umask, as nnU-Net's folders


def test_evaluate_warns_of_labels_found_in_no_reference(tmp_path):
    from nndiffseg.evaluation.evaluate import evaluate_folders, format_table

    for folder in ("ref", "pred"):
        (tmp_path / folder).mkdir()
        for case in ("a", "b"):
            label = np.zeros((8, 8), np.uint8)
            label[2:6, 2:6] = 1
            if folder == "pred" and case == "b":
                label[0, 0] = 5
            Image.fromarray(label).save(tmp_path / folder / f"{case}.png")
    summary = evaluate_folders(str(tmp_path / "ref"), str(tmp_path / "pred"), num_processes=1)
    assert len(summary["warnings"]) == 1 and "label(s) 5" in summary["warnings"][0] and "b (" in summary["warnings"][0]
    assert "WARNING: label(s) 5" in format_table(summary)
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_stopping_the_export_pool_is_bounded_when_its_lock_is_held():
    """Pool.terminate waits for the task queue's lock; were it held for good (a worker killed or stuck while
    holding it), a Ctrl-C'd prediction would hang. stop_pool kills the workers after its timeout instead."""
    import multiprocessing

    from nndiffseg.pools import stop_pool

    pool = multiprocessing.get_context("spawn").Pool(1)
    pool.apply_async(time.sleep, (60,))  # the worker is busy, not waiting on the queue's lock
    worker = pool._pool[0]
    lock = pool._inqueue._rlock
    assert lock.acquire(timeout=30)
    try:
        started = time.monotonic()
        stop_pool(pool, timeout=1.0)
        assert time.monotonic() - started < 5
        assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    finally:
        lock.release()  # the abandoned terminate() then finishes in its thread


def test_interrupted_tool_exits_even_if_its_cleanup_at_exit_hangs():
    script = ("import atexit, time\n"
              "import nndiffseg.errors as errors\n"
              "errors.EXIT_DEADLINE_S = 0.5\n"
              "atexit.register(time.sleep, 120)\n"
              "def main():\n"
              "    raise KeyboardInterrupt\n"
              "errors.run_cli(main)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 130 and result.stderr.strip() == "Interrupted.", result.stderr


def test_the_test_seam_is_inert_unless_its_variable_names_the_point(monkeypatch, capsys):
    monkeypatch.delenv(HOOK_ENV, raising=False)
    reached("checkpoint_written")
    monkeypatch.setenv(HOOK_ENV, "another_point:pause")
    reached("checkpoint_written")  # returns at once: no pause
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(HOOK_ENV, "another_point,checkpoint_written")
    reached("checkpoint_written")
    assert capsys.readouterr().out == f"{MARKER}: checkpoint_written\n"


def test_a_paused_tool_acts_on_ctrl_c_delivered_to_another_thread():
    """The kernel may hand SIGINT to any thread (torch's, the export pool's); Python then raises
    KeyboardInterrupt only when the main thread next runs bytecode. A pause in one long sleep held it off for
    the whole pause (the Ctrl-C test's intermittent 60 s timeout); the hook's sliced pause does not."""
    script = ("import os, signal, threading, time\n"
              "os.environ['nnDiffSeg_test_hook'] = 'here:pause'\n"
              "from nndiffseg.test_seam import reached\n"
              "other = threading.Thread(target=threading.Event().wait, daemon=True)\n"
              "other.start()\n"
              "threading.Timer(1.0, signal.pthread_kill, (other.ident, signal.SIGINT)).start()\n"
              "start = time.monotonic()\n"
              "try:\n"
              "    reached('here')\n"
              "except KeyboardInterrupt:\n"
              "    print(f'interrupted after {time.monotonic() - start:.1f} s')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=200,
                            preexec_fn=_as_a_shell_starts_it)
    assert result.stdout.splitlines()[-1].startswith("interrupted after"), result.stdout + result.stderr
    assert float(result.stdout.split()[-2]) < 5, result.stdout


def test_ctrl_c_while_a_tool_is_still_importing_ends_quietly():
    """Ctrl-C lands while the tool's imports (torch, nnU-Net: seconds) run: emulated by a module finder that
    raises KeyboardInterrupt when the console script imports nnDiffSeg_predict's module."""
    script = ("import sys\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'nndiffseg.inference.predict':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "from nndiffseg.console import predict\n"
              "predict()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and result.stderr.strip() == "Interrupted.", result.stderr


def test_every_console_script_runs_its_tool():
    from importlib.metadata import entry_points

    import nndiffseg.console as console
    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.value.startswith("nndiffseg.")}
    assert set(scripts) == set(console.TOOLS)
    for name, script in scripts.items():
        assert script.value == f"nndiffseg.console:{name.removeprefix('nnDiffSeg_')}"
        assert callable(console.load_tool(name)) and callable(script.load())
