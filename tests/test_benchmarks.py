"""The benchmark harness end to end: a tiny scenario (toy data, nnUNetTrainer and the latent trainer, which trains
its mask autoencoder stage itself, 1 epoch of 2 iterations) trained, predicted and evaluated through the tools."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import Model, Scenario, main, table  # noqa: E402

pytestmark = pytest.mark.slow  # runs nnU-Net tools (make test-fast leaves it out)

TINY = Scenario("tiny", [Model("nnUNetTrainer"), Model("nnDiffSegTrainerLatent")], size=64, num_train=6, num_test=3,
                epochs=1, iters=2)


@pytest.fixture(scope="module")
def tiny_run(module_tmp):
    work = module_tmp("bench") / "work"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_n_proc_DA", "0")  # no data augmentation workers to start
        assert main([TINY], ["--work_dir", str(work)]) == 0
    return work, json.loads((work / "results.json").read_text())


def test_rows_ratios_and_paired_comparison(tiny_run):
    work, result = tiny_run
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["nnUNetTrainer", "nnDiffSegTrainerLatent"]
    for row in rows.values():
        assert row["train"]["wall_s"] > 0 and row["train"]["peak_mib"] > 100 and row["train"]["s_per_iter"] > 0
        assert all(ratio > 0 for ratio in row["x_baseline"].values())
    assert rows["nnUNetTrainer"]["x_baseline"]["predict_wall_s"] == 1
    latent = rows["nnDiffSegTrainerLatent"]
    assert {"train_s_per_iter", "train_wall_s", "predict_wall_s", "predict_peak_mib"} <= set(latent["x_baseline"])
    vs = latent["vs_baseline"]
    assert vs["cases"] == 3 and 0 <= vs["better"] <= 3 and 0 <= vs["p"] <= 1
    assert vs["mean_diff"] == pytest.approx(sum(latent["case_dice"][c] - rows["nnUNetTrainer"]["case_dice"][c]
                                                for c in latent["case_dice"]) / 3)


def test_case_dice_is_what_evaluate_wrote(tiny_run):
    work, result = tiny_run
    for row in result["rows"]:
        summary = json.loads((work / "predictions" / row["model"] / "summary.json").read_text())
        assert row["dice"] == summary["mean"]["dice"]
        assert row["case_dice"] == {c["case"]: c["mean"]["dice"] for c in summary["cases"]}
        assert len(list((work / "predictions" / row["model"]).glob("*.png"))) == 3


def test_table(tiny_run):
    work, result = tiny_run
    text = (work / "results.md").read_text()
    assert text == table(result)
    header, rule, *rows = text.splitlines()[2:]
    assert header.count(" x ") == 2 and "vs nnU-Net" in header
    assert len(rows) == 2 and all(r.count("|") == header.count("|") for r in rows)
    baseline = rows[0].split("|")
    assert baseline[4].strip() == "1.00"  # train ratio
    # predict ratio: blank where the baseline's time per image was lost in the noise (harness: s_per_image None)
    assert baseline[8].strip() == ("1.00" if result["rows"][0]["predict"]["s_per_image"] else "")
    assert rows[1].split("|")[-2].strip().endswith("/3)")


def test_resume_keeps_finished_rows_and_refuses_a_used_folder(tiny_run, capsys):
    work, result = tiny_run
    with pytest.raises(SystemExit, match="not empty"):
        main([TINY], ["--work_dir", str(work)])
    assert main([TINY], ["--work_dir", str(work), "--resume"]) == 0  # nothing left to run: no child starts
    assert json.loads((work / "results.json").read_text())["rows"] == result["rows"]
