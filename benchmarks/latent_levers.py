"""What each lever buys the single-step latent trainer, against nnUNetTrainer on the real ISIC sample (fold 0).

Rows: nnUNetTrainer at the latent runs' iterations and at the default latent run's total training time (mask
autoencoder stage included); nnDiffSegTrainerLatent (every lever on) and one variant per lever switched off or
changed (benchmarks/latent_lever_trainers/); the compact trainer as it was before ("before": KL-f8 image
encoder, f8 latent, latent losses only, noise prediction with t uniform). Columns: Dice on the fold's
validation cases, the paired difference against nnU-Net at equal time (Wilcoxon signed-rank), seconds per
training iteration and per image (nnU-Net's predictor, batch 1, no mirroring, network time only), and the mask
autoencoders' reconstruction Dice. Also a curve: nnU-Net's pseudo Dice against training time for nnUNetTrainer
and the default latent trainer.

    python benchmarks/latent_levers.py --work_dir /tmp/levers --max_size 128 --epochs 12 --iters 25

With ``--data stroke_fixture`` the same on synthetic 3-class brain CT written by stroke2021_fixture (the SDMC-Seg
setting: Dice per class), predicting its SDMC-Seg test split; ``--main_only`` leaves out the lever rows,
``--only TRAINER ...`` keeps only those trainers' rows (with ``--resume``, to add rows to a finished run).
Every step runs in its own process; results.json in the work folder keeps what is done (--resume goes on).
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_isic_sample_arguments, make_work_dir, predict_timed, run_child,  # noqa: E402
                    seconds_per_train_iter, train_timed)

from nndiffseg.trainers.latent import MASK_STAGE_EPOCH_FRACTION  # noqa: E402
from nndiffseg.visualization.figures import figure_style, save_figure  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
VARIANTS_DIR = HERE.parent / "latent_lever_trainers"
DATASET_IDS = {"isic": 983, "stroke_fixture": 984}  # isic_head_to_head._prepare converts the sample under 983
PLANS = "nnDiffSegPlans"
BASELINE, LATENT = "nnUNetTrainer", "nnDiffSegTrainerLatent"
MASK_STAGES = ("nnDiffSegTrainerMaskVAE", "nnDiffSegTrainerMaskVAE_f8")
# row name -> (trainer, its mask autoencoder stage)
LATENT_ROWS = {
    "latent, default (clean latent predicted at t = 999, latent L1 only)": (LATENT, MASK_STAGES[0]),
    "+ decoded-mask loss (the default of the first rows)": ("nnDiffSegTrainerLatent_decodedLoss", MASK_STAGES[0]),
    "+ decoded-mask loss, noise prediction (SDSeg's) at t = 999": ("nnDiffSegTrainerLatent_epsInferenceT",
                                                                   MASK_STAGES[0]),
    "+ decoded-mask loss, clean latent, t uniform": ("nnDiffSegTrainerLatent_x0uniform", MASK_STAGES[0]),
    "+ decoded-mask loss, noise prediction, t uniform (SDSeg's; the default before)": (
        "nnDiffSegTrainerLatent_epsUniform", MASK_STAGES[0]),
    "- KL image encoder instead of nnU-Net's": ("nnDiffSegTrainerLatent_klEncoder", MASK_STAGES[0]),
    "- f8 latent": ("nnDiffSegTrainerLatent_f8", MASK_STAGES[1]),
    "before (KL encoder, f8, latent losses only, noise prediction, t uniform)": ("nnDiffSegTrainerLatent_before",
                                                                                  MASK_STAGES[1]),
    "+ foreground weight 4 in the latent L1": ("nnDiffSegTrainerLatent_fgWeight4", MASK_STAGES[0]),
}
DEFAULT_ROW = "latent, default (clean latent predicted at t = 999, latent L1 only)"
FIRST_LEVERS = ("+ decoded-mask loss (the default of the first rows)",
                "+ decoded-mask loss, noise prediction (SDSeg's) at t = 999",
                "+ decoded-mask loss, clean latent, t uniform",
                "+ decoded-mask loss, noise prediction, t uniform (SDSeg's; the default before)")
EQUAL_TIME, EQUAL_TIME_RESULTS = "nnUNetTrainer (equal time)", "nnUNet_results_equal_time"


def epoch_dice_per_class(work: Path, results: str, dataset_name: str, trainer: str) -> tuple:
    """(epoch seconds, pseudo Dice per foreground class) per epoch, from nnU-Net's log."""
    fold = work / results / dataset_name / f"{trainer}__{PLANS}__2d" / "fold_0"
    text = "".join(log.read_text() for log in sorted(fold.glob("training_log_*.txt")))
    dice = [[float(v) for v in re.findall(r"(?<![\w.])(\d+\.?\d*(?:e-?\d+)?)(?![\w(])", listed)]
            for listed in re.findall(r"Pseudo dice \[(.*?)\]", text)]
    return [float(s) for s in re.findall(r"Epoch time: ([\d.]+) s", text)], dice


def _epoch_curve(work: Path, results: str, dataset_name: str, trainer: str, offset_s: float = 0.0) -> list:
    """[(cumulative training seconds, mean pseudo Dice)] per epoch, from nnU-Net's log."""
    seconds, dice = epoch_dice_per_class(work, results, dataset_name, trainer)
    times, total = [], offset_s
    for s in seconds:
        total += s
        times.append(total)
    return [[t, sum(d) / len(d)] for t, d in zip(times, dice)]


def trailing_mean(values: list, n: int = 3) -> list:
    """The mean of the last n values at every point (fewer at the start): a readable pseudo Dice curve, where
    nnU-Net's own EMA (0.9) lags too far behind a run of a dozen epochs."""
    return [sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]


def _prepare_stroke_fixture(work: Path, size: int, per_class: int) -> dict:
    """Synthetic 3-class brain CT (background, ischemic, hemorrhagic) from stroke2021_fixture, converted with
    SDMC-Seg's split (80/10/10 % per class; fold 0 = its train/val); its test slices are the ones predicted."""
    from nndiffseg.dataset_conversion.stroke2021 import convert_stroke2021
    from nndiffseg.dataset_conversion.stroke2021_fixture import write_stroke2021_fixture
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess
    fixture = write_stroke2021_fixture(work / "stroke2021_fixture", "competition", num_ischemic=per_class,
                                       num_hemorrhagic=per_class, num_nonstroke=0, size=size)
    dataset = convert_stroke2021(fixture.source, DATASET_IDS["stroke_fixture"], split="sdmcseg", num_processes=2)
    plan_and_preprocess([DATASET_IDS["stroke_fixture"]], ["2d"], num_processes=[2], num_processes_fingerprint=2)
    return {"dataset": str(dataset), "images": str(dataset / "imagesTs"), "labels": str(dataset / "labelsTs"),
            "num_train": len(list((dataset / "labelsTr").iterdir()))}


def _child(args: argparse.Namespace, work: Path) -> dict:
    step, *rest = args._child
    os.environ["nnUNet_results"] = str(work / args.results)
    dataset_id = DATASET_IDS[args.data]
    if step == "prepare" and args.data == "stroke_fixture":
        return _prepare_stroke_fixture(work, args.max_size, args.fixture_slices)
    if step == "prepare":
        from isic_head_to_head import _prepare
        return _prepare(work, Path(args.isic_sample), args.max_size, 0)
    if step == "train":
        return train_timed(dataset_id, rest[0], int(rest[1]), args.iters, plans=PLANS)
    if step == "reconstruction":
        from nndiffseg.utils import dataset_name_from_id
        summary = (work / args.results / dataset_name_from_id(dataset_id) / f"{rest[0]}__{PLANS}__2d" / "fold_0" /
                   "validation" / "summary.json")
        return json.loads(summary.read_text())
    return predict_timed(Path(args.prepared_images), Path(args.prepared_labels), work / "predictions" / rest[1],
                         dataset_id, rest[0], plans=PLANS)


def _train_s(training: dict, name: str, iters: int) -> float:
    """Training seconds of a run: epochs x iterations x its median seconds per iteration (start-up, validation
    and the final validation left out, as for every row)."""
    return training[name].get("epochs_run", training[name]["epochs"]) * iters * training[name]["s_per_iter"]


def _measure(args: argparse.Namespace, work: Path) -> dict:
    saved = json.loads((work / "results.json").read_text()) if args.resume else None
    if saved is None:
        make_work_dir(work)
        saved = {"prepared": None, "training": {}, "rows": {}, "reconstruction": {}, "wall_s": 0.0}
    started = time.time() - saved["wall_s"]

    def save() -> None:
        saved["wall_s"] = time.time() - started
        (work / "results.json").write_text(json.dumps(saved, indent=1))

    os.environ["nnUNet_extTrainer"] = str(VARIANTS_DIR)
    forwarded = ["--isic_sample", Path(args.isic_sample).resolve(), "--max_size", args.max_size, "--iters", args.iters,
                 "--data", args.data, "--fixture_slices", args.fixture_slices]
    prepared = saved["prepared"] = saved["prepared"] or run_child(HERE, work, "prepare", options=forwarded)
    save()
    forwarded += ["--prepared_images", prepared["images"], "--prepared_labels", prepared["labels"]]
    dataset_name = Path(prepared["dataset"]).name
    training = saved["training"]
    mask_epochs = max(1, round(args.mask_epoch_fraction * args.epochs))
    # each model is predicted right after its training, and the most telling rows come first, so a run stopped
    # early (and its report) holds complete rows
    plan = [(f"{BASELINE} (same iterations)", BASELINE, args.epochs, "nnUNet_results"),
            (MASK_STAGES[0], MASK_STAGES[0], mask_epochs, "nnUNet_results"),
            (DEFAULT_ROW, LATENT, args.epochs, "nnUNet_results")]
    # the most telling before equal time; --main_only: the default and nnU-Net alone
    first_levers = [] if args.main_only else [name for name in LATENT_ROWS if name in FIRST_LEVERS]
    plan += [(name, LATENT_ROWS[name][0], args.epochs, "nnUNet_results") for name in first_levers]
    plan += [(EQUAL_TIME, BASELINE, None, EQUAL_TIME_RESULTS)]
    plan += [(name, trainer, args.epochs, "nnUNet_results") for name, (trainer, stage) in LATENT_ROWS.items()
             if name != DEFAULT_ROW and stage == MASK_STAGES[0] and name not in first_levers]
    plan += [(MASK_STAGES[1], MASK_STAGES[1], mask_epochs, "nnUNet_results")]
    plan += [(name, trainer, args.epochs, "nnUNet_results") for name, (trainer, stage) in LATENT_ROWS.items()
             if stage == MASK_STAGES[1]]
    if args.main_only:
        plan = plan[:4]
    if args.only:
        plan = [step for step in plan if step[1] in args.only]
    for name, trainer, epochs, results in plan:
        key = MASK_STAGES[MASK_STAGES.index(name)] if name in MASK_STAGES else \
            (EQUAL_TIME if name == EQUAL_TIME else trainer)
        if key not in training:
            if name == EQUAL_TIME:
                total = sum(_train_s(training, t, args.iters) for t in LATENT_ROWS[DEFAULT_ROW])
                epochs = max(1, round(total / (training[BASELINE]["s_per_iter"] * args.iters)))
            print(f"training {name}: {epochs} epochs x {args.iters} iterations", flush=True)
            result = run_child(HERE, work, "train", trainer, epochs, options=[*forwarded, "--results", results])
            result.update(epochs=epochs, s_per_iter=seconds_per_train_iter(work, dataset_name, trainer, args.iters,
                                                                             plans=PLANS, results=results),
                          epochs_run=len(_epoch_curve(work, results, dataset_name, trainer)))  # a stage may stop early
            training[key] = result
            save()
        if name in MASK_STAGES:
            saved["reconstruction"][name] = saved["reconstruction"].get(name) or run_child(
                HERE, work, "reconstruction", name, options=forwarded)
        elif name not in saved["rows"]:
            print(f"predicting: {name}", flush=True)
            out = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
            saved["rows"][name] = run_child(HERE, work, "predict", trainer, out,
                                            options=[*forwarded, "--results", results])
        save()
    return saved


def _curves(saved: dict, work: Path, iters: int) -> dict:
    """Pseudo Dice per epoch against derived training time: epochs x iterations x the median seconds per
    iteration of the runs that fixed the equal-time budget (nnU-Net's same-iterations run, the latent run and
    its stage), so that both curves use the clock that made them equal; the latent curve starts after its
    mask autoencoder stage."""
    dataset_name, training = Path(saved["prepared"]["dataset"]).name, saved["training"]
    curves = {}
    for name, results, trainer, clock, offset in (
            (EQUAL_TIME, EQUAL_TIME_RESULTS, BASELINE, BASELINE, 0.0),
            (f"{LATENT} (after its mask autoencoder stage)", "nnUNet_results", LATENT, LATENT,
             _train_s(training, MASK_STAGES[0], iters) if MASK_STAGES[0] in training else 0.0)):
        if clock in training:
            points = _epoch_curve(work, results, dataset_name, trainer)
            curves[name] = [[offset + (i + 1) * iters * training[clock]["s_per_iter"], dice]
                            for i, (_, dice) in enumerate(points)]
    return curves


def _wilcoxon(a: dict, b: dict) -> str:
    from scipy.stats import wilcoxon
    cases = sorted(set(a) & set(b))
    diff = [a[c] - b[c] for c in cases]
    if not any(diff):
        return "0.000"
    better = sum(d > 0 for d in diff)
    return f"{sum(diff) / len(diff):+.3f} (p {wilcoxon(diff).pvalue:.2g}, better in {better}/{len(diff)})"


def report(saved: dict, argv: list, figure: Path) -> str:
    training, rows, iters = saved["training"], saved["rows"], saved["iters"]
    reference = rows.get(EQUAL_TIME, {}).get("case_dice")
    base_image_s = rows[f"{BASELINE} (same iterations)"]["s_per_image"]
    base_iter_s = training[BASELINE]["s_per_iter"]
    lines = ["    python benchmarks/latent_levers.py " + " ".join(argv), "",
             (f"ISIC 2017 sample, max_size {saved['max_size']}, fold 0 ({len(next(iter(rows.values()))['case_dice'])} "
              f"validation cases), " if saved.get("data", "isic") == "isic" else
              f"Synthetic 3-class brain CT (stroke2021_fixture, {saved['max_size']} x {saved['max_size']} slices, "
              f"{saved['prepared']['num_train']} for training, fold 0 = SDMC-Seg's train/val split; "
              f"{len(next(iter(rows.values()))['case_dice'])} test slices predicted; Dice per class in brackets: "
              f"ischemic / hemorrhagic), ") +
             f"{training[BASELINE]['epochs']} x {iters} iterations per latent trainer, its mask autoencoder stage "
             f"at most "
             f"{training[MASK_STAGES[0]]['epochs']} x {iters} (it ran {training[MASK_STAGES[0]]['epochs_run']}). "
             f"2 CPU cores, {os.environ.get('OMP_NUM_THREADS') or 'all'} torch thread(s) per process, whole run "
             f"{saved['wall_s'] / 60:.0f} min. Training time: iterations x the median seconds per iteration "
             f"(nnU-Net's epoch times, the first left out), both stages summed for the latent rows; the equal-time "
             f"row's epochs and minutes use the same-iterations run's seconds per iteration (its own run may have "
             f"met a busier or quieter machine: its own seconds per iteration and per image are shown as measured).",
             "",
             "| model | Dice | vs nnU-Net equal time (mean, Wilcoxon p) | s / train iter | x nnU-Net | training "
             "min (both stages) | s / image | x nnU-Net | mask AE reconstruction Dice |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        if name in LATENT_ROWS:
            trainer, stage = LATENT_ROWS[name]
            total = _train_s(training, trainer, iters) + _train_s(training, stage, iters)
            recon = saved["reconstruction"][stage]["reconstruction_dice"]
            recon = " / ".join(f"{v:.4f}" for v in recon.values())
        else:
            trainer, recon = name if name == EQUAL_TIME else BASELINE, "-"
            total = _train_s(training, trainer, iters)
            if name == EQUAL_TIME:  # its budget was set with the same-iterations run's clock: time it by that clock
                total = training[name]["epochs"] * iters * training[BASELINE]["s_per_iter"]
        s_iter = training[trainer]["s_per_iter"]
        versus = "-" if name == EQUAL_TIME or reference is None else _wilcoxon(row["case_dice"], reference)
        per_class = row.get("class_dice") or {}
        dice = f"{row['dice']:.4f}" + (" (" + " / ".join(f"{v:.3f}" for v in per_class.values()) + ")"
                                       if len(per_class) > 1 else "")
        lines.append(f"| {name} | {dice} | {versus} | {s_iter:.2f} | {s_iter / base_iter_s:.2f} | "
                     f"{total / 60:.1f} | {row['s_per_image']:.3f} | {row['s_per_image'] / base_image_s:.2f} | "
                     f"{recon} |")
    lines += ["", f"![Pseudo Dice against training time]({figure.name})"]
    return "\n".join(lines)


def plot_curve(saved: dict, path: Path) -> None:
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for name, points in saved["curve"].items():
            if points:
                t, d = zip(*points)
                minutes = [x / 60 for x in t]
                line, = ax.plot(minutes, trailing_mean(d), linewidth=2, label=f"{name}: mean of the last 3 epochs")
                ax.plot(minutes, d, marker="o", markersize=3, linestyle=":", alpha=0.45, color=line.get_color(),
                        label=f"{name}: per epoch")
        ax.set_xlabel("training time (min; epochs x iterations x median s / iteration of the runs that set the budget)")
        ax.set_ylabel("nnU-Net's pseudo Dice (validation patches)")
        ax.set_title(f"ISIC sample, max_size {saved['max_size']}, fold 0" if saved.get("data", "isic") == "isic" else
                     f"synthetic 3-class brain CT, {saved['max_size']} px slices, fold 0")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
        fig.tight_layout()
        save_figure(fig, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_isic_sample_arguments(parser, REPO)
    parser.add_argument("--data", choices=tuple(DATASET_IDS), default="isic",
                        help="the real ISIC sample (fold 0's validation cases predicted) or synthetic 3-class brain "
                             "CT from stroke2021_fixture (its SDMC-Seg test split predicted; --max_size: the slice "
                             "edge)")
    parser.add_argument("--main_only", action="store_true",
                        help="only nnUNetTrainer (same iterations and equal time) and the default latent trainer")
    parser.add_argument("--only", nargs="+", metavar="TRAINER",
                        help="train and predict only the rows of these trainers (with --resume: add rows to a run)")
    parser.add_argument("--fixture_slices", type=int, default=60, help="stroke_fixture: slices per lesion class")
    parser.add_argument("--mask_epoch_fraction", type=float, default=MASK_STAGE_EPOCH_FRACTION,
                        help="the mask autoencoder stage's epochs at most, as a fraction of --epochs (default: "
                             "the trainer's own MASK_STAGE_EPOCH_FRACTION)")
    parser.add_argument("--figure", default=str(REPO / "docs" / "latent_levers_curve.png"))
    parser.add_argument("--resume", action="store_true", help="go on with the work folder's results.json")
    parser.add_argument("--report_only", action="store_true",
                        help="write the report from what results.json holds (a run stopped early: its rows so far)")
    parser.add_argument("--results", default="nnUNet_results", help=argparse.SUPPRESS)
    parser.add_argument("--prepared_images", help=argparse.SUPPRESS)
    parser.add_argument("--prepared_labels", help=argparse.SUPPRESS)
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args._child:
        print(json.dumps(_child(args, work)))
        return 0
    saved = json.loads((work / "results.json").read_text()) if args.report_only else _measure(args, work)
    saved.update(max_size=args.max_size, iters=args.iters, data=args.data, curve=_curves(saved, work, args.iters))
    figure = Path(args.figure)
    plot_curve(saved, figure)
    text = report(saved, [a for a in argv if a not in ("--resume", "--report_only")], figure)
    (work / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
