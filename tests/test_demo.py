"""The demo command end to end (shortened run), and its refusal to clobber an earlier run."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "nndiffseg.demo.run_demo", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_demo_runs_the_whole_workflow(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("-o", out, "--num_epochs", 1, "--iters_per_epoch", 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"=== {step}" in result.stdout
    assert "mean Dice on 12 held-out cases" in result.stdout
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert len(summary["cases"]) == 12
    auroc = summary["uncertainty"]["spread"]["all_labels"]["pixel_auroc"]
    assert f"with AUROC {auroc:.3f}" in result.stdout
    assert summary["calibration"]["mean"]["ece"] is not None
    assert (out / "predictions" / "summary_figures" / "risk_coverage.png").is_file()
    assert len(list((out / "overlays").glob("*_overlay.png"))) == 12
    assert len(list((out / "predictions" / "uncertainty").glob("*.png"))) == 12  # the guided trainer's spread
    assert (out / "nnUNet_raw" / "Dataset990_ISIC2016" / "dataset.json").is_file()
    assert (out / ".nndiffseg_demo").is_file()  # the stamp that lets --overwrite replace this folder


def test_demo_refuses_a_non_empty_folder(tmp_path):
    """Even with --overwrite, a folder the demo did not write (no stamp file) is never removed."""
    (tmp_path / "keep.txt").write_text("earlier work")
    result = run_demo("-o", tmp_path, "--overwrite")
    assert result.returncode == 1 and "was not written by nnDiffSeg_demo" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
