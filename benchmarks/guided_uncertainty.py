"""Does the guided head's uncertainty map say where it is wrong, better than nnU-Net's own softmax? On the real
ISIC sample (fold 0, or --fold): nnUNetTrainer (at the guided run's iterations and at its training time), the
guided trainer under several sampling settings, and the guided model's prior alone ("does diffusion matter"), each
predicted with probabilities and (guided) uncertainty maps and scored by nnDiffSeg_evaluate's calibration and
failure-detection metrics. Dice is compared case by case (Wilcoxon signed-rank) against nnUNetTrainer at
equal time.

Default rule (the issue's): among the guided settings within 0.5 Dice points of the best guided Dice, the best
pixel AUROC of the uncertainty map (the samples' spread, or the total with the prior's variance: the settings
named "... total"), at no more than 10x nnU-Net's seconds per image at 256 x 256 on the CPU. That ratio is
derived from the cost model measured at 256 x 256 by benchmarks/guided_vs_nnunet.py (the prior once per image,
one denoiser pass per sample and step); the seconds per image measured here are at the run's --max_size.

    python benchmarks/guided_uncertainty.py --work_dir /tmp/gu --max_size 128 --epochs 12 --iters 25

``--variants`` adds guided training variants (benchmarks/guided_variant_trainers/: v prediction, a smaller
denoiser), each trained like the guided trainer and predicted under ``--variant_settings``; ``--settings``
keeps only some of the guided trainer's sampling settings.

Every step runs in its own process; results.json in the work folder keeps what is done (--resume goes on).
"""
import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_isic_sample_arguments, make_work_dir, run_child, seconds_per_train_iter,  # noqa: E402
                    train_timed)

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DATASET_ID = 983  # isic_head_to_head._prepare converts the sample under this ID
BASELINE, GUIDED, PRIOR = "nnUNetTrainer", "nnDiffSegTrainerGuided", "prior alone"
EQUAL_TIME_RESULTS = "nnUNet_results_equal_time"
VARIANTS_DIR = HERE.parent / "guided_variant_trainers"
TWO_STAGE, TWO_STAGE_RESULTS = "two-stage guided", "nnUNet_results_two_stage"
PLANS = "nnDiffSegPlans"
# name -> inference options; the first is the checkpoint's own setting
SETTINGS = {
    "ddim-1 K5": dict(sampler="ddim", steps=1, num_samples=5),
    "ddim-10 K5": dict(sampler="ddim", steps=10, num_samples=5),
    "ddim-5 eta1 K5": dict(sampler="ddim", steps=5, eta=1.0, num_samples=5),
    "ddpm-10 K5": dict(sampler="ddpm", steps=10, num_samples=5),
    "ddim-3 eta1 from prior@0.5 K5": dict(sampler="ddim", steps=3, eta=1.0, strength=0.5, num_samples=5),
    "ddim-5 eta1 from prior@0.3 K5": dict(sampler="ddim", steps=5, eta=1.0, strength=0.3, num_samples=5),
    "ddim-5 eta1 K10": dict(sampler="ddim", steps=5, eta=1.0, num_samples=10),
    # within the rule's time limit at 256 x 256 (K x S <= 3, see TIME_LIMIT)
    "ddim-1 K3": dict(sampler="ddim", steps=1, num_samples=3),
    "ddim-1 from prior@0.3 K3": dict(sampler="ddim", steps=1, strength=0.3, num_samples=3),
    "ddim-1 from prior@0.5 K3": dict(sampler="ddim", steps=1, strength=0.5, num_samples=3),
    # the uncertainty that adds the prior's own variance to the samples' (the others: the samples' spread alone)
    "ddim-1 K3 total": dict(sampler="ddim", steps=1, num_samples=3, uncertainty="total"),
    "ddim-1 K5 total": dict(sampler="ddim", steps=1, num_samples=5, uncertainty="total"),
    # the samples' mean averaged with the prior's probabilities (the others: the samples' mean)
    "ddim-1 K3 total with_prior": dict(sampler="ddim", steps=1, num_samples=3, uncertainty="total",
                                       fusion="with_prior"),
}
SETTINGS = {name: {"uncertainty": "spread", "fusion": "mean", **options} for name, options in SETTINGS.items()}
DICE_TOLERANCE = 0.005
TIME_LIMIT = 10.0  # x nnU-Net's seconds per image at 256 x 256 on the CPU
# Seconds per 256 x 256 image on the 2-core CPU, measured by benchmarks/guided_vs_nnunet.py (docs/benchmarks.md,
# "Guided trainer against nnU-Net: speed at 256 x 256"): nnU-Net's forward, and the guided head's cost
# a + b x samples x steps (prior and text once per image, one denoiser pass per sample and step)
NNUNET_256, GUIDED_FIXED_256, PER_SAMPLE_STEP_256 = 0.28, 0.5, 2.96 / 5


def derived_ratio_256(options: dict) -> float:
    """The guided setting's seconds per 256 x 256 image over nnU-Net's, from the measured cost model."""
    return (GUIDED_FIXED_256 + PER_SAMPLE_STEP_256 * options["num_samples"] * options["steps"]) / NNUNET_256


def _prior_alone_model(work: Path, dataset_name: str, fold: int) -> None:
    """An nnUNetTrainer fold holding the guided model's prior (the same planned U-Net), in its own results
    folder, so nnU-Net's predictor predicts with the prior exactly as it would with a plain nnU-Net."""
    import shutil

    import torch
    source = work / "nnUNet_results" / dataset_name / f"{GUIDED}__{PLANS}__2d"
    target = work / "nnUNet_results_prior" / dataset_name / f"{BASELINE}__{PLANS}__2d"
    (target / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    for f in ("dataset.json", "plans.json"):
        shutil.copy(source / f, target / f)
    checkpoint = torch.load(source / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = {k[len("prior."):]: v for k, v in checkpoint["network_weights"].items()
                                     if k.startswith("prior.")}
    checkpoint["trainer_name"] = BASELINE
    torch.save(checkpoint, target / f"fold_{fold}" / "checkpoint_final.pth")


def predict_and_score(work: Path, images: Path, labels: Path, out: Path, trainer: str, options: dict,
                      fold: int) -> dict:
    """nnDiffSeg_predict's predict_folder with probabilities (and uncertainty maps for the guided trainer), timed
    per image end to end, then nnDiffSeg_evaluate's summary."""
    import torch

    from nndiffseg.evaluation.evaluate import evaluate_folders
    from nndiffseg.inference.predict import predict_folder
    torch.set_num_threads(os.cpu_count() or 1)
    guided = trainer.startswith(GUIDED)
    start = time.perf_counter()
    failures = predict_folder(str(images), str(out), DATASET_ID, "2d", trainer, PLANS, [fold], device="cpu",
                              use_tta=False, save_probabilities=True, num_processes_export=0,
                              inference_options=options if guided else None, save_uncertainty=guided)
    seconds = (time.perf_counter() - start) / len(list(images.glob("*.png")))
    assert not failures, failures
    return {"s_per_image": seconds, **row_from_summary(evaluate_folders(str(labels), str(out), num_processes=1))}


def row_from_summary(summary: dict) -> dict:
    """A table row from nnDiffSeg_evaluate's summary: Dice (mean and per case), ECE, Brier, and per uncertainty
    source its failure-detection metrics."""
    row = {"dice": summary["mean"]["dice"], "case_dice": {c["case"]: c["mean"]["dice"] for c in summary["cases"]},
           "ece": summary["calibration"]["mean"]["ece"], "brier": summary["calibration"]["mean"]["brier"]}
    for source, block in summary["uncertainty"].items():
        row[source] = {k: block["all_labels"][k] for k in ("pixel_auroc", "uncertainty_error_overlap",
                                                           "case_spearman", "aurc")}
    return row


def _child(args: argparse.Namespace, work: Path) -> dict:
    step, *rest = args._child
    if step == "prepare":
        from isic_head_to_head import _prepare
        return _prepare(work, Path(args.isic_sample), args.max_size, args.fold)
    if step == "train":
        trainer, epochs = rest[0], int(rest[1])
        os.environ["nnUNet_results"] = str(work / rest[2])
        options = {"clip_model": "random"} if trainer.startswith(GUIDED) else None
        if len(rest) > 3:  # the two-stage way: a finished nnUNetTrainer fold as the frozen prior
            options.update(prior=rest[3], freeze_prior=True)
        return train_timed(DATASET_ID, trainer, epochs, args.iters, plans=PLANS, options=options, fold=args.fold)
    if step == "prior":
        _prior_alone_model(work, rest[0], args.fold)
        return {}
    trainer, results, images, labels, out, options = rest[0], rest[1], *map(Path, rest[2:5]), json.loads(rest[5])
    os.environ["nnUNet_results"] = str(work / results)
    return predict_and_score(work, images, labels, out, trainer, options, args.fold)


def prediction_folder(name: str) -> str:
    """The folder under WORK/predictions that holds a row's predictions."""
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("'", "")


def start_run(script: Path, args: argparse.Namespace, work: Path) -> tuple:
    """The run's record, results.json in the work folder (new, or read back with --resume), with the sample
    prepared; a save() that writes it with the wall time so far; and the options SCRIPT's children get."""
    saved = json.loads((work / "results.json").read_text()) if args.resume else None
    if saved is None:
        make_work_dir(work)
        saved = {"prepared": None, "training": {}, "rows": {}, "wall_s": 0.0}
    started = time.time() - saved["wall_s"]

    def save() -> None:
        saved["wall_s"] = time.time() - started
        (work / "results.json").write_text(json.dumps(saved, indent=1))

    forwarded = ["--isic_sample", Path(args.isic_sample).resolve(), "--max_size", args.max_size,
                 "--iters", args.iters, "--fold", args.fold]
    saved["prepared"] = saved["prepared"] or run_child(script, work, "prepare", options=forwarded)
    save()
    return saved, save, forwarded


def predict_rows(script: Path, work: Path, saved: dict, save, runs: list, forwarded: list) -> None:
    """Predict and score each (row name, trainer, results folder, inference options) not yet in the record."""
    prepared = saved["prepared"]
    for name, trainer, results, options in runs:
        if name in saved["rows"]:
            continue
        print(f"predicting: {name}", flush=True)
        saved["rows"][name] = run_child(script, work, "predict", trainer, results, prepared["images"],
                                        prepared["labels"], work / "predictions" / prediction_folder(name),
                                        json.dumps(options), options=forwarded)
        save()


def _measure(args: argparse.Namespace, work: Path) -> dict:
    saved, save, forwarded = start_run(HERE, args, work)
    dataset_name = Path(saved["prepared"]["dataset"]).name
    training = saved["training"]
    plan = [(BASELINE, args.epochs, "nnUNet_results"), (GUIDED, args.epochs, "nnUNet_results"),
            ("equal time", None, EQUAL_TIME_RESULTS)]
    plan += [(variant, args.epochs, "nnUNet_results") for variant in args.variants]
    if args.two_stage_epochs:
        plan.append((TWO_STAGE, args.two_stage_epochs, TWO_STAGE_RESULTS))
    for trainer, epochs, results in plan:
        if trainer in training:
            continue
        name, extra = trainer, []
        if trainer == "equal time":
            ratio = training[GUIDED]["s_per_iter"] / training[BASELINE]["s_per_iter"]
            name, epochs = BASELINE, max(1, round(args.epochs * ratio))
        if trainer == TWO_STAGE:
            name = GUIDED
            extra = [work / "nnUNet_results" / dataset_name / f"{BASELINE}__{PLANS}__2d" / f"fold_{args.fold}" /
                     "checkpoint_final.pth"]
        print(f"training {trainer}: {epochs} epochs x {args.iters} iterations", flush=True)
        result = run_child(HERE, work, "train", name, epochs, results, *extra, options=forwarded)
        result.update(epochs=epochs, s_per_iter=seconds_per_train_iter(work, dataset_name, name, args.iters,
                                                                         plans=PLANS, results=results, fold=args.fold))
        training[trainer] = result
        save()
    if not (work / "nnUNet_results_prior").exists():
        run_child(HERE, work, "prior", dataset_name, options=forwarded)
    runs = [(f"{BASELINE} (same iterations)", BASELINE, "nnUNet_results", {}),
            (f"{BASELINE} (equal time)", BASELINE, EQUAL_TIME_RESULTS, {}),
            (f"{PRIOR} (guided model's U-Net)", BASELINE, "nnUNet_results_prior", {})]
    runs += [(f"guided {name}", GUIDED, "nnUNet_results", SETTINGS[name]) for name in args.settings]
    runs += [(f"{variant} {name}", variant, "nnUNet_results", SETTINGS[name])
             for variant in args.variants for name in args.variant_settings]
    if TWO_STAGE in training:
        runs += [(f"{TWO_STAGE} {name}", GUIDED, TWO_STAGE_RESULTS, SETTINGS[name]) for name in args.two_stage_settings]
    predict_rows(HERE, work, saved, save, runs, forwarded)
    return saved


def choose_default(rows: dict) -> str:
    guided = {n: r for n, r in rows.items() if n.startswith("guided ") and
              derived_ratio_256(SETTINGS[n[len("guided "):]]) <= TIME_LIMIT}  # the variants' rows are not candidates
    best = max(r["dice"] for r in guided.values())
    close = {n: r for n, r in guided.items() if r["dice"] >= best - DICE_TOLERANCE}
    return max(close, key=lambda n: close[n]["spread"]["pixel_auroc"])


def report(saved: dict, argv: list) -> str:
    from scipy.stats import wilcoxon
    rows, training = saved["rows"], saved["training"]
    reference = rows[f"{BASELINE} (equal time)"]
    baseline_seconds = rows[f"{BASELINE} (same iterations)"]["s_per_image"]
    chosen = choose_default(rows)
    minutes = {k: v["wall_s"] / 60 for k, v in training.items()}

    def ratio_256(name: str) -> str:
        if name.startswith(GUIDED):  # a variant: the cost model holds for the default denoiser only
            return "-"
        setting = name.split(" ", 1)[1] if name.startswith("guided ") else name[len(TWO_STAGE) + 1:]
        return f"{derived_ratio_256(SETTINGS[setting]):.1f}" if setting in SETTINGS else "1.0"
    two_stage = [] if TWO_STAGE not in training else [
        "", f"Two-stage: the finished nnUNetTrainer fold ({minutes[BASELINE]:.1f} min) as a frozen prior, then "
            f"{training[TWO_STAGE]['epochs']} x {saved['iters']} guided iterations ({training[TWO_STAGE]['s_per_iter']:.2f} s "
            f"each, {minutes[TWO_STAGE]:.1f} min): {minutes[BASELINE] + minutes[TWO_STAGE]:.1f} min in all, against "
            f"{minutes[GUIDED]:.1f} min for the joint guided run and {minutes['equal time']:.1f} min for nnUNetTrainer "
            f"at equal time (training wall time, each stage in its own process)."]
    lines = [f"    python benchmarks/guided_uncertainty.py {shlex.join(map(str, argv))}", "",
             f"Training: nnUNetTrainer {training[BASELINE]['epochs']} x {saved['iters']} iterations "
             f"({training[BASELINE]['s_per_iter']:.2f} s each), guided {training[GUIDED]['epochs']} x {saved['iters']} "
             f"({training[GUIDED]['s_per_iter']:.2f} s each, {training[GUIDED]['s_per_iter'] / training[BASELINE]['s_per_iter']:.1f}x), "
             + "".join(f"{v} {training[v]['epochs']} x {saved['iters']} ({training[v]['s_per_iter']:.2f} s each, "
                       f"{training[v]['s_per_iter'] / training[BASELINE]['s_per_iter']:.1f}x), "
                       for v in training if v.startswith(GUIDED) and v != GUIDED)
             + f"nnUNetTrainer at the guided run's time {training['equal time']['epochs']} x {saved['iters']}. "
             f"Whole run {saved['wall_s'] / 60:.0f} min.", *two_stage, "",
             "| model / setting | Dice | vs nnU-Net equal time (Wilcoxon p) | ECE | Brier | uncertainty | pixel AUROC "
             "| overlap | case Spearman | AURC | s / image | x nnU-Net | x nnU-Net at 256² (derived) |",
             "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        cases = sorted(r["case_dice"])
        diff = [r["case_dice"][c] - reference["case_dice"][c] for c in cases]
        p = wilcoxon(diff).pvalue if any(diff) else 1.0
        paired = f"{sum(diff) / len(diff):+.3f} (p {p:.2g})" if r is not reference else "-"
        for source in ("spread", "entropy"):
            if source not in r:
                continue
            u = r[source]
            label = f"**{name}**" if name == chosen and source == "spread" else name
            lines.append(f"| {label} | {r['dice']:.3f} | {paired} | {r['ece']:.3f} | {r['brier']:.3f} | {source} | "
                         f"{u['pixel_auroc']:.3f} | {u['uncertainty_error_overlap']:.3f} | {u['case_spearman']:.2f} | "
                         f"{u['aurc']:.3f} | {r['s_per_image']:.2f} | {r['s_per_image'] / baseline_seconds:.1f} | "
                         f"{ratio_256(name)} |")
    lines += ["", f"Rule's choice: **{chosen}**."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_isic_sample_arguments(parser, REPO)
    parser.add_argument("--fold", type=int, default=0, choices=range(5), help="the cross-validation fold to train")
    parser.add_argument("--two_stage_epochs", type=int, default=0,
                        help="also train the guided trainer on the finished nnUNetTrainer fold as a frozen --prior")
    parser.add_argument("--two_stage_settings", nargs="+", default=["ddim-1 K3", "ddim-1 K5"],
                        help="sampling settings predicted with the two-stage model")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING",
                        help="the guided trainer's sampling settings to predict with (default: all of SETTINGS)")
    parser.add_argument("--variants", nargs="+", default=[], metavar="TRAINER",
                        help="guided trainer variants of benchmarks/guided_variant_trainers/ to train and predict")
    parser.add_argument("--variant_settings", nargs="+", default=["ddim-1 K3"], choices=list(SETTINGS), metavar="SETTING",
                        help="sampling settings predicted with each variant")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args.variants:
        defined = set(re.findall(r"^class (\w+)\(", "".join(f.read_text() for f in VARIANTS_DIR.glob("*.py")), re.M))
        unknown = [v for v in args.variants if v not in defined]
        if unknown:
            print(f"ERROR: --variants {' '.join(unknown)}: not defined in {VARIANTS_DIR} (there: "
                  f"{', '.join(sorted(defined))})", file=sys.stderr)
            return 2
        os.environ["nnUNet_extTrainer"] = str(VARIANTS_DIR)  # the children inherit it
    if args._child:
        print(json.dumps(_child(args, work)))
        return 0
    saved = _measure(args, work)
    saved["iters"] = args.iters
    text = report(saved, [a for a in argv if a != "--resume"])
    (work / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
