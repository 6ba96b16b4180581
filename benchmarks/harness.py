"""The benchmark harness: a scenario (dataset, models, run length, prediction options) is run through the public
nnDiffSeg_ tools, each step in its own child process, in a work folder of its own; nnUNetTrainer runs beside the
nndiffseg trainers in the same run, so every row carries its ratio to nnU-Net's and, for quality, a paired per-case
comparison. Writes WORK/results.json (rewritten after every step) and WORK/results.md (the Markdown table).

A scenario file holds a list SCENARIOS and ends with ``sys.exit(main(SCENARIOS))``; see docs/benchmarks.md.
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nndiffseg.files import write_json, write_text

BASELINE = "nnUNetTrainer"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NNDIFFSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclasses.dataclass
class Model:
    """One trained model: ``trainer`` trained with ``train_args`` and, unless ``predict`` is False (a training
    stage such as nnDiffSegTrainerMaskVAE), predicted with ``predict_args`` (nnDiffSeg_predict's options)."""
    trainer: str
    train_args: Sequence[str] = ()
    predict_args: Sequence[str] = ()
    predict: bool = True
    label: Optional[str] = None  # the row's name (default: the trainer's); one trained model may give several rows
    results: str = "nnUNet_results"  # another folder trains the same trainer again (e.g. for a longer run)

    @property
    def name(self) -> str:
        return self.label or self.trainer


@dataclasses.dataclass
class Scenario:
    """``dataset``: "toy" (synthetic dermoscopy, size x size, its test cases predicted) or "isic" (the real ISIC
    2017 sample in $NNDIFFSEG_SHARED_DATA, shrunk to ``size``, fold ``fold``'s validation cases predicted).
    ``models`` run in order; the first nnUNetTrainer row is the reference of every ratio."""
    name: str
    models: Sequence[Model]
    dataset: str = "toy"
    size: int = 64
    num_train: int = 12
    num_test: int = 8
    epochs: int = 2
    iters: int = 5
    fold: int = 0
    device: str = "cpu"
    dataset_id: int = 990
    note: str = ""


def tool(name: str, *args, work: Path, log: Path, echo: str = "", results: str = "nnUNet_results") -> dict:
    """Runs ``nnDiffSeg_NAME ARGS`` with the work folder's nnU-Net folders; its output goes to ``log`` (lines
    matching ``echo`` also to stderr, as progress). Returns wall seconds and the child's peak resident MiB."""
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / results))
    env.setdefault("nnUNet_n_proc_DA", "2")
    # what the console script nnDiffSeg_NAME runs (setup.py), also where pip --target installed no scripts
    command = [sys.executable, "-c", f"import sys; from nndiffseg.console import {name}; "
               f"sys.argv[0] = 'nnDiffSeg_{name}'; sys.exit({name}())", *map(str, args)]
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in child.stdout:
            out.write(line)
            if echo and re.search(echo, line):
                print("    " + line.rstrip(), file=sys.stderr, flush=True)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over every child so far)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"nnDiffSeg_{name} failed (exit {child.returncode}); see {log}")
    return {"wall_s": time.perf_counter() - start, "peak_mib": usage.ru_maxrss / 1024}  # Linux: KiB


def prepare(scenario: Scenario, work: Path, log: Path) -> tuple[Path, Path]:
    """Converts and plans the dataset; returns the folders of the images to predict and their references."""
    if scenario.dataset == "toy":
        from nndiffseg.demo.synthetic_dermoscopy import write_isic2016_layout
        source = write_isic2016_layout(work / "source", scenario.num_train, scenario.num_test, scenario.size,
                                       scenario.size)
        max_size = 0
    elif scenario.dataset == "isic":
        source, max_size = SHARED_DATA / "isic2017_sample", scenario.size
        if not source.is_dir():
            sys.exit(f"ERROR: the ISIC sample is not at {source}; set NNDIFFSEG_SHARED_DATA to its parent folder")
    else:
        raise ValueError(f"unknown dataset {scenario.dataset!r}")
    tool("convert_isic", "-i", source, "-d", scenario.dataset_id, "--max_size", max_size, work=work, log=log)
    tool("plan_and_preprocess", "-d", scenario.dataset_id, "-np", 2, "-npfp", 2, work=work, log=log)
    raw = next((work / "nnUNet_raw").glob(f"Dataset{scenario.dataset_id:03d}_*"))
    if (raw / "labelsTs").is_dir():
        return raw / "imagesTs", raw / "labelsTs"
    return held_out(raw, work / "nnUNet_preprocessed" / raw.name, scenario.fold, work)


def held_out(raw: Path, preprocessed: Path, fold: int, work: Path) -> tuple[Path, Path]:
    """Writes nnU-Net's own 5-fold split (the one training would make) and copies fold FOLD's validation cases."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    cases = sorted(f.name[:-len(".png")] for f in (raw / "labelsTr").glob("*.png"))
    splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    write_json(preprocessed / "splits_final.json", splits)
    images, labels = work / "val_images", work / "val_labels"
    images.mkdir()
    labels.mkdir()
    for case in splits[fold]["val"]:
        shutil.copy(raw / "imagesTr" / f"{case}_0000.png", images)
        shutil.copy(raw / "labelsTr" / f"{case}.png", labels)
    return images, labels


def seconds_per_iteration(folder: Path, trainer: str, iters: int, fold: int) -> Optional[float]:
    """Median epoch time / iterations from nnU-Net's training log (the first epoch, warm-up, left out)."""
    logs = sorted(folder.glob(f"*/{trainer}__*__2d/fold_{fold}/training_log_*.txt"))
    times = [float(t) for log in logs for t in re.findall(r"Epoch time: ([\d.]+) s", log.read_text())]
    return statistics.median(times[1:] or times) / iters if times else None


def paired(cases: dict, reference: dict) -> dict:
    """Per-case Dice against the reference's: mean difference, Wilcoxon signed-rank p, cases better."""
    from scipy.stats import wilcoxon
    common = sorted(set(cases) & set(reference))
    diffs = [cases[c] - reference[c] for c in common]
    p = float(wilcoxon(diffs).pvalue) if any(diffs) else 1.0
    return {"mean_diff": statistics.fmean(diffs), "p": p, "better": sum(d > 0 for d in diffs), "cases": len(common)}


def run_model(model: Model, scenario: Scenario, work: Path, images: Path, labels: Path, trained: set) -> dict:
    row = {"model": model.name, "trainer": model.trainer, "results": model.results}
    log = work / "logs" / f"{model.name}.log"
    log.parent.mkdir(exist_ok=True)
    common, key = ("-device", scenario.device), f"{model.results}/{model.trainer}"
    if key not in trained:  # --overwrite: a run that --resume repeats may have left a partial fold folder
        row["train"] = tool("train", scenario.dataset_id, "2d", scenario.fold, "-tr", model.trainer, *common,
                            "--num_epochs", scenario.epochs, "--iters_per_epoch", scenario.iters, "--overwrite",
                            *model.train_args,
                            work=work, log=log, echo=r"Epoch \d+$", results=model.results)
        row["train"]["s_per_iter"] = seconds_per_iteration(work / model.results, model.trainer, scenario.iters,
                                                           scenario.fold)
        trained.add(key)
    if not model.predict:
        return row
    out = work / "predictions" / model.name
    predict = ("-d", scenario.dataset_id, "-c", "2d", "-tr", model.trainer, "-f", scenario.fold, *common,
               "--disable_tta", "-nps", 0, *model.predict_args)
    row["predict"] = tool("predict", "-i", images, "-o", out, *predict, work=work, log=log, results=model.results)
    # the same with one image: the difference per further image leaves out start-up and model loading
    one = work / "one_image"
    if not one.is_dir():
        one.mkdir()
        case = sorted(images.glob("*_0000.*"))[0].name.split("_0000.")[0]
        for channel in images.glob(f"{case}_*"):
            shutil.copy(channel, one)
    single = tool("predict", "-i", one, "-o", work / "predictions_one" / model.name, *predict, work=work, log=log,
                  results=model.results)
    extra = (row["predict"]["wall_s"] - single["wall_s"]) / max(len(list(labels.glob("*.png"))) - 1, 1)
    row["predict"]["s_per_image"] = extra if extra > 0 else None  # None: too few images to tell from the noise
    tool("evaluate", "-ref", labels, "-pred", out, "-o", out / "summary.json", "--no_plots", "-np", 1,
         work=work, log=log)
    summary = json.loads((out / "summary.json").read_text())
    row["dice"] = summary["mean"]["dice"]
    row["case_dice"] = {c["case"]: c["mean"]["dice"] for c in summary["cases"]}
    return row


def add_comparisons(rows: list) -> None:
    """Ratios to the first nnUNetTrainer row, and the paired per-case comparison with it."""
    base = next((r for r in rows if r["trainer"] == BASELINE), None)
    if base is None:
        return
    for row in rows:
        row["x_baseline"] = {f"{stage}_{key}": row[stage][key] / base[stage][key]
                             for stage in ("train", "predict") if stage in row and stage in base
                             for key in row[stage] if row[stage][key] and base[stage].get(key)}
        if "case_dice" in row and "case_dice" in base and row is not base:
            row["vs_baseline"] = paired(row["case_dice"], base["case_dice"])


COLUMNS = [("train s", "train", "wall_s", "{:.0f}"), ("s / iter", "train", "s_per_iter", "{:.3f}"),
           ("x", "x_baseline", "train_s_per_iter", "{:.2f}"), ("train MiB", "train", "peak_mib", "{:.0f}"),
           ("predict s", "predict", "wall_s", "{:.1f}"), ("s / image", "predict", "s_per_image", "{:.3f}"),
           ("x", "x_baseline", "predict_s_per_image", "{:.2f}"), ("predict MiB", "predict", "peak_mib", "{:.0f}"),
           ("Dice", "dice", None, "{:.4f}")]


def table(result: dict) -> str:
    """The Markdown table of a result: one row per model, ratios to nnUNetTrainer, the paired comparison."""
    s = result["scenario"]
    lines = [f"Scenario `{s['name']}`: {s['dataset']} at {s['size']} px, fold {s['fold']}, {s['epochs']} x "
             f"{s['iters']} iterations, {s['device']}; {result['machine']}; {result['wall_s']:.0f} s in all. "
             "s / image: the prediction time per image beyond the first (start-up and model loading left out); "
             "x: ratio to nnUNetTrainer; vs nnU-Net: paired per-case Dice difference (Wilcoxon p, cases better).", "",
             "| model | " + " | ".join(c[0] for c in COLUMNS) + " | vs nnU-Net |",
             "| --- |" + " ---: |" * len(COLUMNS) + " --- |"]
    for row in result["rows"]:
        cells = []
        for _, group, key, fmt in COLUMNS:
            value = row.get(group) if key is None else row.get(group, {}).get(key)
            cells.append(fmt.format(value) if value is not None else "")
        vs = row.get("vs_baseline")
        cells.append(f"{vs['mean_diff']:+.3f} (p {vs['p']:.2g}, {vs['better']}/{vs['cases']})" if vs else "")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(scenario: Scenario, work: Path, resume: bool = False) -> dict:
    """Runs SCENARIO in WORK (new, or with ``resume`` a folder of an interrupted run: rows done are kept)."""
    start, results = time.perf_counter(), work / "results.json"
    before = json.loads(results.read_text()) if resume and results.exists() else {"rows": [], "wall_s": 0}
    done, start = {r["model"]: r for r in before["rows"]}, start - before["wall_s"]  # wall time: both runs
    if not resume and work.exists() and any(work.iterdir()):
        sys.exit(f"ERROR: {work} is not empty; give a new --work_dir (or --resume)")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs"):
        (work / name).mkdir(parents=True, exist_ok=True)
    print(f"[{scenario.name}] preparing the {scenario.dataset} dataset", file=sys.stderr, flush=True)
    if resume and (work / "inputs.json").exists():
        images, labels = map(Path, json.loads((work / "inputs.json").read_text()))
    else:
        images, labels = prepare(scenario, work, work / "logs" / "prepare.log")
        write_json(work / "inputs.json", [str(images), str(labels)])
    result = {"scenario": {k: v for k, v in dataclasses.asdict(scenario).items() if k != "models"},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "rows": []}
    trained = {f"{r['results']}/{r['trainer']}" for r in done.values() if "train" in r}
    for i, model in enumerate(scenario.models, 1):
        print(f"[{scenario.name}] {i}/{len(scenario.models)} {model.name} "
              f"({time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)
        row = done.get(model.name) or run_model(model, scenario, work, images, labels, trained)
        result["rows"].append(row)
        result["wall_s"] = time.perf_counter() - start
        add_comparisons(result["rows"])
        write_json(results, result)
    write_text(work / "results.md", table(result))
    return result


def main(scenarios: Sequence[Scenario], argv: Optional[Sequence[str]] = None) -> int:
    names = [s.name for s in scenarios]
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="a new folder for this run")
    parser.add_argument("--scenario", choices=names, default=names[0], help=f"default: {names[0]}")
    parser.add_argument("--device", help="override the scenario's device (cpu, cuda, mps)")
    parser.add_argument("--epochs", type=int, help="override the scenario's epochs")
    parser.add_argument("--iters", type=int, help="override the scenario's iterations per epoch")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --work_dir")
    args = parser.parse_args(argv)
    scenario = scenarios[names.index(args.scenario)]
    overrides = {k: v for k, v in (("device", args.device), ("epochs", args.epochs), ("iters", args.iters)) if v}
    result = run(dataclasses.replace(scenario, **overrides), Path(args.work_dir).resolve(), args.resume)
    print(table(result))
    return 0
