"""The two-stage way at equal training time: does the guided head on top of a finished nnU-Net fold beat
nnU-Net given the same total time? On the real ISIC sample (fold 0, or --fold):

- nnUNetTrainer for --epochs (the reference);
- nnUNetTrainer for --prior_epochs, then the guided trainer for --head_epochs on it as a frozen ``--prior``
  (choose the two so that both stages together take the reference's time: a frozen-prior head iteration cost
  1.8 nnU-Net iterations at 128 px on the 2-core CPU; the report gives the measured minutes of each stage);
- with --addon_epochs, also the guided head on the reference itself, frozen (the add-on rows: what the head adds
  to the very U-Net it sits on, as for a user who already has a finished nnU-Net fold; more than equal time);
- predicted: the reference, the prior alone (the "does diffusion matter" ablation: the same U-Net without the
  head) and the two-stage model under each of --settings, all through nnDiffSeg_predict's code and scored by
  nnDiffSeg_evaluate (benchmarks/guided_uncertainty.py's predict_and_score).

Dice is compared case by case (Wilcoxon signed-rank) against the reference and against the prior alone, and
the issue's goal is checked row by row: pixel AUROC and case Spearman of the map above nnU-Net's softmax
entropy, ECE no worse, Dice within 0.5 points.

    python benchmarks/guided_two_stage.py --work_dir /tmp/gts --max_size 128 --iters 25 --epochs 35 --prior_epochs 25 --head_epochs 5 --addon_epochs 5

Every step runs in its own process; results.json in the work folder keeps what is done (--resume goes on).
With one finished work folder per fold, ``--pool`` scores all their cases together (a 5-fold cross-validation,
as nnU-Net reports one): nnDiffSeg_evaluate on the union of each row's predictions, so pixel AUROC, ECE and case
Spearman are over every pixel and case, and the paired Dice statistics over every case:

    python benchmarks/guided_two_stage.py --work_dir /tmp/gts_pooled --pool /tmp/gts_f0 /tmp/gts_f1 /tmp/gts_f2 /tmp/gts_f3 /tmp/gts_f4
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_isic_sample_arguments, run_child, seconds_per_train_iter  # noqa: E402
from guided_uncertainty import (BASELINE, DICE_TOLERANCE, GUIDED, PLANS, SETTINGS, predict_rows,  # noqa: E402
                                prediction_folder, row_from_summary, start_run)
from guided_uncertainty import _child as uncertainty_child  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
REFERENCE, PRIOR, HEAD, ADDON = "reference", "prior", "head", "addon"
RESULTS = {REFERENCE: "nnUNet_results", PRIOR: "nnUNet_results_prior", HEAD: "nnUNet_results_two_stage",
           ADDON: "nnUNet_results_addon"}
DEFAULT_SETTINGS = ["ddim-1 K3 total with_prior", "ddim-1 K3 total", "ddim-1 K3"]


def _row_name(stage: str, epochs: dict, setting: str = "") -> str:
    if stage == REFERENCE:
        return f"{BASELINE} {epochs[REFERENCE]} epochs (reference)"
    if stage == PRIOR:
        return f"{BASELINE} {epochs[PRIOR]} epochs (prior alone)"
    if stage == ADDON:
        return f"add-on {epochs[REFERENCE]} + {epochs[ADDON]} epochs, {setting}"
    return f"two-stage {epochs[PRIOR]} + {epochs[HEAD]} epochs, {setting}"


def _measure(args: argparse.Namespace, work: Path) -> dict:
    saved, save, forwarded = start_run(HERE, args, work)
    dataset_name = Path(saved["prepared"]["dataset"]).name
    epochs = saved["epochs"] = {REFERENCE: args.epochs, PRIOR: args.prior_epochs, HEAD: args.head_epochs,
                                ADDON: args.addon_epochs}
    saved["iters"] = args.iters

    def checkpoint(stage: str) -> Path:
        return (work / RESULTS[stage] / dataset_name / f"{BASELINE}__{PLANS}__2d" / f"fold_{args.fold}" /
                "checkpoint_final.pth")
    plan = [(REFERENCE, BASELINE, []), (PRIOR, BASELINE, []), (HEAD, GUIDED, [checkpoint(PRIOR)])]
    if args.addon_epochs:
        plan.append((ADDON, GUIDED, [checkpoint(REFERENCE)]))
    for stage, trainer, extra in plan:
        if stage in saved["training"]:
            continue
        print(f"training {stage} ({trainer}): {epochs[stage]} epochs x {args.iters} iterations", flush=True)
        result = run_child(HERE, work, "train", trainer, epochs[stage], RESULTS[stage], *extra, options=forwarded)
        result["s_per_iter"] = seconds_per_train_iter(work, dataset_name, trainer, args.iters, plans=PLANS,
                                                      results=RESULTS[stage], fold=args.fold)
        saved["training"][stage] = result
        save()
    runs = [(_row_name(REFERENCE, epochs), BASELINE, RESULTS[REFERENCE], {}),
            (_row_name(PRIOR, epochs), BASELINE, RESULTS[PRIOR], {})]
    runs += [(_row_name(stage, epochs, name), GUIDED, RESULTS[stage], SETTINGS[name])
             for stage in (HEAD, ADDON) if epochs[stage] for name in args.settings]
    predict_rows(HERE, work, saved, save, runs, forwarded)
    return saved


def _paired(row: dict, reference: dict) -> str:
    from scipy.stats import wilcoxon
    if row is reference:
        return "-"
    diff = [row["case_dice"][c] - reference["case_dice"][c] for c in sorted(row["case_dice"])]
    p = wilcoxon(diff).pvalue if any(diff) else 1.0
    better = sum(d > 0 for d in diff)
    return f"{sum(diff) / len(diff):+.3f} (p {p:.2g}, {better}/{len(diff)})"


def goal_check(row: dict, reference: dict) -> dict:
    """The issue's goal for one row against nnUNetTrainer at equal time (its softmax entropy): each part True
    or False."""
    source = "spread" if "spread" in row else "entropy"
    return {"pixel AUROC": row[source]["pixel_auroc"] > reference["entropy"]["pixel_auroc"],
            "case Spearman": row[source]["case_spearman"] > reference["entropy"]["case_spearman"],
            "ECE": row["ece"] <= reference["ece"],
            "Dice": row["dice"] >= reference["dice"] - DICE_TOLERANCE}


def _training_line(saved: dict) -> str:
    training, epochs, iters = saved["training"], saved["epochs"], saved["iters"]
    seconds = {k: v["s_per_iter"] for k, v in training.items()}
    minutes = {k: v["wall_s"] / 60 for k, v in training.items()}
    return (f"nnUNetTrainer {epochs[REFERENCE]} x {iters} iterations ({seconds[REFERENCE]:.2f} s each) "
            f"{minutes[REFERENCE]:.1f} min; two-stage: nnUNetTrainer {epochs[PRIOR]} x {iters} ({seconds[PRIOR]:.2f} s "
            f"each) {minutes[PRIOR]:.1f} min, then the guided head on it, frozen, {epochs[HEAD]} x {iters} "
            f"({seconds[HEAD]:.2f} s each, {seconds[HEAD] / seconds[PRIOR]:.1f}x) {minutes[HEAD]:.1f} min: "
            f"{minutes[PRIOR] + minutes[HEAD]:.1f} min in all"
            + (f"; add-on: the head on the reference, frozen, {epochs[ADDON]} x {iters} ({seconds[ADDON]:.2f} s each) "
               f"{minutes[ADDON]:.1f} min" if ADDON in training else ""))


def report(saved: dict, argv: list) -> str:
    lines = [f"    python benchmarks/guided_two_stage.py {shlex.join(map(str, argv))}", "",
             f"Training (wall time, each stage in its own process): {_training_line(saved)}. "
             f"Whole run {saved['wall_s'] / 60:.0f} min.", ""]
    return "\n".join(lines + table(saved["rows"], saved["epochs"]))


def table(rows: dict, epochs: dict) -> list:
    """The rows as a markdown table, with paired Dice against the reference and the prior alone and the goal
    check of each row's own map."""
    reference = rows[_row_name(REFERENCE, epochs)]
    prior = rows[_row_name(PRIOR, epochs)]
    lines = ["| model / setting | Dice | vs reference (Wilcoxon p, better on) | vs prior alone | ECE | Brier | "
             "uncertainty | pixel AUROC | case Spearman | AURC | s / image | goal parts met |",
             "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        primary = "spread" if "spread" in r else "entropy"
        met = goal_check(r, reference) if r is not reference else {}
        met_text = ", ".join(k for k, v in met.items() if v) or ("-" if r is reference else "none")
        for source in ("spread", "entropy"):
            if source not in r:
                continue
            u = r[source]
            against_prior = _paired(r, prior) if name.startswith("two-stage") else "-"
            lines.append(f"| {name} | {r['dice']:.3f} | {_paired(r, reference)} | {against_prior} | {r['ece']:.3f} | "
                         f"{r['brier']:.3f} | {source} | {u['pixel_auroc']:.3f} | {u['case_spearman']:.2f} | "
                         f"{u['aurc']:.3f} | {r['s_per_image']:.2f} | {met_text if source == primary else ''} |")
    lines += ["", "Uncertainty \"spread\" is the map `--save_uncertainty` wrote (the setting's measure); \"goal parts "
              "met\" compares that map (nnU-Net rows: their entropy) with the reference's softmax entropy. The add-on "
              "rows put the head on the reference itself: the same U-Net, so they show what the head adds to it, at "
              "more than the reference's time (not an equal-time comparison)."]
    return lines


def pool(work_dirs: list, out: Path, argv: list) -> str:
    """Every fold's cases scored together: each row's predictions and the references linked into one folder
    per row under OUT, then nnDiffSeg_evaluate (with its reliability diagram and risk-coverage curve)."""
    from nndiffseg.evaluation.evaluate import evaluate_folders
    missing = [str(Path(w) / "results.json") for w in work_dirs if not (Path(w) / "results.json").is_file()]
    if missing or out.exists():
        raise SystemExit(f"ERROR: --pool: {', '.join(missing)} not found (not a finished work folder)" if missing
                         else f"ERROR: --work_dir {out} exists; give a new folder for the pooled scores")
    runs = [json.loads((Path(w) / "results.json").read_text()) for w in work_dirs]
    epochs = runs[0]["epochs"]
    if any(r["epochs"] != epochs or set(r["rows"]) != set(runs[0]["rows"]) for r in runs):
        raise SystemExit("ERROR: --pool needs work folders of the same epochs and settings, each finished")
    out.mkdir(parents=True)
    labels = out / "labels"
    labels.mkdir()
    rows = {}
    for name in runs[0]["rows"]:
        folder = out / prediction_folder(name)
        (folder / "uncertainty").mkdir(parents=True)
        for work in map(Path, work_dirs):
            source = work / "predictions" / folder.name
            for f in source.glob("*.*"):
                if f.suffix in (".png", ".npz", ".pkl"):
                    (folder / f.name).symlink_to(f)
            for f in (source / "uncertainty").glob("*.npz"):
                (folder / "uncertainty" / f.name).symlink_to(f)
            for f in (work / "val_labels").glob("*.png"):
                if not (labels / f.name).exists():
                    (labels / f.name).symlink_to(f)
        print(f"scoring: {name}", flush=True)
        rows[name] = {"s_per_image": sum(r["rows"][name]["s_per_image"] for r in runs) / len(runs),
                      **row_from_summary(evaluate_folders(str(labels), str(folder), num_processes=2))}
    lines = [f"    python benchmarks/guided_two_stage.py {shlex.join(map(str, argv))}", "",
             f"{len(runs)} folds, {len(rows[_row_name(REFERENCE, epochs)]['case_dice'])} cases; training per fold "
             "(wall time, each stage in its own process):", ""]
    lines += [f"- {Path(w).name}: {_training_line(r)}" for w, r in zip(work_dirs, runs)]
    short = [n.split(", ", 1)[0].split(" epochs")[0] + (f", {n.split(', ', 1)[1]}" if ", " in n else "")
             for n in rows]
    lines += ["", f"Dice per fold ({' / '.join(short)}):", ""]
    for w, r in zip(work_dirs, runs):
        lines.append(f"- {Path(w).name}: " + " / ".join(f"{row['dice']:.3f}" for row in r["rows"].values()))
    return "\n".join(lines + [""] + table(rows, epochs))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_isic_sample_arguments(parser, REPO, epochs=35)
    parser.add_argument("--fold", type=int, default=0, choices=range(5), help="the cross-validation fold to train")
    parser.add_argument("--prior_epochs", type=int, default=25, help="nnUNetTrainer epochs of the two-stage prior")
    parser.add_argument("--head_epochs", type=int, default=5, help="guided head epochs on the frozen prior")
    parser.add_argument("--addon_epochs", type=int, default=0,
                        help="also train the head on the reference itself, frozen, for this many epochs (the add-on "
                             "rows: what the head adds to the same U-Net)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS), metavar="SETTING",
                        help="sampling settings to predict the two-stage model with (guided_uncertainty.SETTINGS)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pool", nargs="+", metavar="WORK_DIR",
                        help="score finished work folders (one per fold) together into --work_dir; trains nothing")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args.pool:
        text = pool(args.pool, work, argv)
        (work / "report.md").write_text(text + "\n")
        print(text)
        return 0
    if args._child:
        print(json.dumps(uncertainty_child(args, work)))
        return 0
    saved = _measure(args, work)
    text = report(saved, [a for a in argv if a != "--resume"])
    (work / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
