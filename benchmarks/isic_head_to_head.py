"""Head to head on the real ISIC sample: nnU-Net's baseline, the guided diffusion trainer and the single-step
latent trainer, trained on the same fold under the same budget and predicted on that fold's validation cases.

For each model: Dice, IoU and tIoU (nnDiffSeg_evaluate), seconds per image through nnU-Net's predictor
(batch 1, no mirroring, preprocessing and export not timed), seconds per training iteration and peak memory,
each step in its own process. The guided model is predicted with every --samplers setting (K samples each)
and with DDPM-1000 x K on the first --ddpm_images validation cases, which also chooses its sampler default:
the fewest steps whose Dice on those cases stays within 0.5 points of DDPM-1000 (same model, same cases).
The sweep runs on --sweep_trainer (default nnDiffSegTrainerGuided, text by cross-attention); the other
conditioning (nnDiffSegTrainerGuided_time, GuidedDiff's timestep embedding) is trained the same way and
predicted with --other_samplers.

Writes, under --docs (default docs/): a section of benchmarks.md (table, command, machine), replaced in place
on a re-run of the same --budget, and isic_head_to_head_<budget>.png (Dice against seconds per image).

    python benchmarks/isic_head_to_head.py --work_dir /tmp/h2h --budget cpu
"""
import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_work_dir, predict_timed, run_child, seconds_per_train_iter, train_timed  # noqa: E402
from nndiffseg.visualization.figures import figure_style, save_figure  # noqa: E402

DATASET_ID = 983
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
BASELINE, GUIDED, GUIDED_TIME = "nnUNetTrainer", "nnDiffSegTrainerGuided", "nnDiffSegTrainerGuided_time"
MASK_VAE, LATENT = "nnDiffSegTrainerMaskVAE", "nnDiffSegTrainerLatent"
TRAINERS = (BASELINE, GUIDED, GUIDED_TIME, MASK_VAE, LATENT)  # the mask autoencoder stage before the latent trainer
# nnUNetTrainer again, for as many epochs as the swept guided trainer's training time buys, in its own results folder
BASELINE_TIME, TIME_RESULTS = "nnUNetTrainer (equal time)", "nnUNet_results_equal_time"
DICE_TOLERANCE = 0.005  # the rule: within half a Dice point of DDPM-1000


def _prepare(work: Path, isic_sample: Path, max_size: int, fold: int) -> dict:
    """Convert and plan the sample, write nnU-Net's 5-fold split (as training would make it) and copy the
    fold's validation cases aside as the images to predict."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nndiffseg.dataset_conversion.isic import convert_isic
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess
    dataset = convert_isic(isic_sample, DATASET_ID, max_size=max_size, num_processes=2)
    plan_and_preprocess([DATASET_ID], ["2d"], num_processes=[2], num_processes_fingerprint=2)
    cases = sorted(f.name[:-len(".png")] for f in (dataset / "labelsTr").glob("*.png"))
    splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    (Path(os.environ["nnUNet_preprocessed"]) / dataset.name / "splits_final.json").write_text(json.dumps(splits))
    images, labels = work / "val_images", work / "val_labels"
    images.mkdir()
    labels.mkdir()
    for case in splits[fold]["val"]:
        shutil.copy(dataset / "imagesTr" / f"{case}_0000.png", images)
        shutil.copy(dataset / "labelsTr" / f"{case}.png", labels)
    return {"dataset": str(dataset), "images": str(images), "labels": str(labels), "num_train": len(cases)}


def _subset(images: Path, labels: Path, n: int, target: Path) -> tuple[Path, Path]:
    (target / "images").mkdir(parents=True, exist_ok=True)
    (target / "labels").mkdir(exist_ok=True)
    for f in sorted(labels.glob("*.png"))[:n]:
        shutil.copy(f, target / "labels")
        shutil.copy(images / f.name.replace(".png", "_0000.png"), target / "images")
    return target / "images", target / "labels"


def _sampler_options(sampler: str, num_samples: int) -> dict:
    name, steps = sampler.split(":")
    return {"sampler": name, "steps": int(steps), "num_samples": num_samples}


def choose_sampler(rows: list[dict], reference: dict, tolerance: float = DICE_TOLERANCE) -> dict:
    """The setting with the fewest steps whose Dice is within ``tolerance`` of the reference (ties: the
    faster one); the reference itself when none is."""
    close = [r for r in rows if r["dice"] >= reference["dice"] - tolerance]
    return min(close, key=lambda r: (int(r["sampler"].split(":")[1]), r["s_per_image"])) if close else reference


def _child(args: argparse.Namespace, work: Path) -> dict:
    step, *rest = args._child
    if step == "prepare":
        return _prepare(work, Path(args.isic_sample), args.max_size, args.fold)
    trainer, epochs = rest[0], args.epochs
    if trainer == BASELINE_TIME:
        os.environ["nnUNet_results"] = str(work / TIME_RESULTS)  # read when nnunetv2 is first imported
        (work / TIME_RESULTS).mkdir(exist_ok=True)
        trainer, epochs = BASELINE, int(rest[-1])
    if step == "train":
        options = {"clip_model": args.clip_model} if trainer in (GUIDED, GUIDED_TIME) else None
        return train_timed(DATASET_ID, trainer, epochs, args.iters, options=options, device=args.device)
    images, labels, out, sampler = Path(rest[1]), Path(rest[2]), Path(rest[3]), rest[4]
    options = _sampler_options(sampler, args.samples) if trainer in (GUIDED, GUIDED_TIME) else None
    return predict_timed(images, labels, out, DATASET_ID, trainer, options, device=args.device)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Dice against seconds per image on the full validation set: one line per guided variant and sampler
    (points labelled by step count), one point per other model."""
    import textwrap

    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(8, 5))
        full = [r for r in rows if not r["subset"]]
        series: dict[tuple[str, str], list[dict]] = {}
        for r in full:
            if r["sampler"] == "-":
                ax.scatter(r["s_per_image"], r["dice"], s=40, color="black" if r["trainer"] == BASELINE else "grey")
                ax.annotate(r["trainer"].replace("nnDiffSegTrainer", ""), (r["s_per_image"], r["dice"]),
                            textcoords="offset points", xytext=(5, -10), fontsize=8)
            else:
                series.setdefault((r["trainer"], r["sampler"].split(":")[0]), []).append(r)
        for (trainer, sampler), points in series.items():
            points.sort(key=lambda r: r["s_per_image"])
            ax.plot([r["s_per_image"] for r in points], [r["dice"] for r in points], marker="o", ms=4,
                    label=f"{trainer.replace('nnDiffSegTrainer', '')}, {sampler} (K samples, steps labelled)")
            for r in points:
                ax.annotate(r["sampler"].split(":")[1], (r["s_per_image"], r["dice"]), textcoords="offset points",
                            xytext=(0, 5), fontsize=7, ha="center")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image, nnU-Net's predictor (log scale)")
        ax.set_ylabel("mean Dice, fold validation cases")
        ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path)


def _replace_section(doc: Path, marker: str, text: str) -> None:
    """Put ``text`` between this marker's start/end comments in ``doc``, appending the section if new."""
    start, end = f"<!-- {marker} start -->", f"<!-- {marker} end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: block, current) if pattern.search(current)
                   else current.rstrip() + "\n\n" + block + "\n")


def _report(args: argparse.Namespace, argv: list[str], training: dict, rows: list[dict],
            chosen: dict, wall: float) -> tuple[str, str]:
    import torch
    base = next(r for r in rows if r["trainer"] == BASELINE)
    n_val = base["images"]
    title = (f"ISIC 2017 sample, max_size {args.max_size}, fold {args.fold} ({n_val} validation cases), "
             f"{args.epochs} x {args.iters} iterations per trainer ({args.budget} budget; nnUNetTrainer also "
             f"for the guided trainer's training time)")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU used"
    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
               f"Python {platform.python_version()}, torch {torch.__version__}")
    command = " ".join(shlex.quote(a) for a in argv if a not in ("--report_again", "--resume"))
    lines = [f"## ISIC head to head ({args.budget} budget)", "", f"    python benchmarks/{HERE.name} {command}", "",
             f"{title}. Machine: {machine}. {wall / 60:.0f} min in all. Guided models: K = {args.samples} "
             f"samples, mean fusion, text from `--clip_model {args.clip_model}`. Seconds per image: nnU-Net's "
             f"predictor, batch 1, no mirroring, median over cases, preprocessing and export not timed.", "",
             "| model | sampler | cases | Dice | IoU | tIoU | s / image | x baseline | peak MiB (predict) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = [BASELINE, BASELINE_TIME, LATENT, GUIDED, GUIDED_TIME]
    for r in sorted(rows, key=lambda r: (r["subset"], order.index(r["trainer"]), r["sampler"].split(":")[0],
                                         int(r["sampler"].split(":")[1]) if ":" in r["sampler"] else 0)):
        lines.append(f"| {r['trainer']} | {r['sampler']} | {r['images']}{' (subset)' if r['subset'] else ''} | "
                     f"{r['dice']:.4f} | {r['iou']:.4f} | {r['tiou']:.4f} | {r['s_per_image']:.3f} | "
                     f"{r['s_per_image'] / base['s_per_image']:.1f} | {r['peak_mib']:.0f} |")
    lines += ["", "| trainer | epochs x iterations | s / train iter | x baseline | training wall time | "
                  "peak MiB (train) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    base_iter = training[BASELINE]["s_per_iter"]
    for trainer, t in training.items():
        lines.append(f"| {trainer} | {t.get('epochs', args.epochs)} x {args.iters} | {t['s_per_iter']:.3f} | "
                     f"{t['s_per_iter'] / base_iter:.2f} | {t['wall_s'] / 60:.1f} min | {t['peak_mib']:.0f} |")
    lines += ["", f"Sampler rule (fewest steps within {DICE_TOLERANCE * 100:.1f} Dice points of {args.reference} x "
                  f"{args.samples} on the same cases): **{chosen['sampler']}** (Dice {chosen['dice']:.4f}).", "",
              f"![Dice against seconds per image](isic_head_to_head_{args.budget}.png)"]
    return "\n".join(lines), title


def _measure(args: argparse.Namespace, work: Path) -> tuple[dict, list[dict], float]:
    """Every step in its own process; with --resume, the steps recorded in results.json are not run again."""
    saved = json.loads((work / "results.json").read_text()) if args.resume and (work / "results.json").exists() \
        else {"prepared": None, "training": {}, "predictions": [], "wall_s": 0.0}
    if not args.resume:
        make_work_dir(work)
    started = time.time() - saved["wall_s"]

    def save() -> None:
        saved["wall_s"] = time.time() - started
        (work / "results.json").write_text(json.dumps(saved, indent=1))

    forwarded = ["--isic_sample", Path(args.isic_sample).resolve(), "--max_size", args.max_size, "--fold",
                 args.fold, "--epochs", args.epochs, "--iters", args.iters, "--samples", args.samples,
                 "--clip_model", args.clip_model, "--device", args.device]
    prepared = saved["prepared"] = saved["prepared"] or run_child(HERE, work, "prepare", options=forwarded)
    save()
    dataset, images, labels = Path(prepared["dataset"]), Path(prepared["images"]), Path(prepared["labels"])
    training = saved["training"]
    for trainer in TRAINERS + (BASELINE_TIME,):
        epochs, extra, results = args.epochs, [], "nnUNet_results"
        if trainer == BASELINE_TIME:
            ratio = training[args.sweep_trainer]["s_per_iter"] / training[BASELINE]["s_per_iter"]
            epochs, extra, results = round(args.epochs * ratio), [round(args.epochs * ratio)], TIME_RESULTS
        if trainer in training:
            continue
        print(f"training {trainer}: {epochs} epochs x {args.iters} iterations", flush=True)
        training[trainer] = run_child(HERE, work, "train", trainer, *extra, options=forwarded)
        training[trainer]["s_per_iter"] = seconds_per_train_iter(work, dataset.name, BASELINE if trainer ==
                                                                 BASELINE_TIME else trainer, args.iters,
                                                                 results=results)
        training[trainer]["epochs"] = epochs
        save()

    runs = [(BASELINE, "-", images, labels), (BASELINE_TIME, "-", images, labels), (LATENT, "-", images, labels)]
    other = GUIDED_TIME if args.sweep_trainer == GUIDED else GUIDED
    runs += [(args.sweep_trainer, s, images, labels) for s in args.samplers]
    runs += [(other, s, images, labels) for s in args.other_samplers]
    if args.ddpm_images:
        subset = (images, labels)
        if args.ddpm_images < len(list(labels.glob("*.png"))):
            subset = _subset(images, labels, args.ddpm_images, work / "ddpm_subset")
            runs += [(args.sweep_trainer, s, *subset) for s in args.samplers]
        runs.append((args.sweep_trainer, args.reference, *subset))
    rows = saved["predictions"]
    for trainer, sampler, imgs, labs in runs:
        subset = imgs != images
        if any((r["trainer"], r["sampler"], r["subset"]) == (trainer, sampler, subset) for r in rows):
            continue
        print(f"predicting with {trainer} {sampler}{' (subset)' if subset else ''}", flush=True)
        out = work / "predictions" / f"{trainer.replace(' ', '_')}_{sampler.replace(':', '')}{'_subset' * subset}"
        extra = [training[BASELINE_TIME]["epochs"]] if trainer == BASELINE_TIME else []
        result = run_child(HERE, work, "predict", trainer, imgs, labs, out, sampler, *extra, options=forwarded)
        rows.append({"trainer": trainer, "sampler": sampler, "subset": subset, **result})
        save()
    return training, rows, saved["wall_s"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="scratch folder (nnU-Net folders, predictions)")
    parser.add_argument("--isic_sample", default=str(REPO.parent / "shared" / "data" / "isic2017_sample"))
    parser.add_argument("--budget", default="cpu", help="name of this budget in the docs (cpu, gpu, ...)")
    parser.add_argument("--max_size", type=int, default=64, help="nnDiffSeg_convert_isic --max_size")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda for the GPU budget (peak memory is then the GPU memory torch allocated)")
    parser.add_argument("--epochs", type=int, default=20, help="training budget, the same for every trainer")
    parser.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--samples", type=int, default=5, help="samples per image (K) for the guided models")
    parser.add_argument("--clip_model", default="random", help="nnDiffSeg_train --clip_model for the guided models")
    parser.add_argument("--samplers", nargs="+", default=["ddim:1", "ddim:2", "ddim:5", "ddim:10", "ddim:20",
                                                          "ddim:50", "dpmsolver:5", "dpmsolver:10", "dpmsolver:20"])
    parser.add_argument("--sweep_trainer", default=GUIDED, choices=[GUIDED, GUIDED_TIME],
                        help="the guided variant predicted with every --samplers setting and the reference")
    parser.add_argument("--other_samplers", nargs="+", default=["ddim:1", "ddim:20"],
                        help="samplers for the other guided variant (the conditioning comparison)")
    parser.add_argument("--reference", default="ddpm:1000", help="the sampler the defaults are chosen against")
    parser.add_argument("--ddpm_images", type=int, default=7, help="cases for the DDPM-1000 reference (0: skip)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder with benchmarks.md ('' to skip)")
    parser.add_argument("--resume", action="store_true", help="go on with the run in --work_dir, skipping the "
                        "steps its results.json records (after a crash, or to add a step)")
    parser.add_argument("--report_again", action="store_true",
                        help="only rewrite the tables, plot and docs from --work_dir's results.json")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args._child:
        print(json.dumps(_child(args, work)))
        return 0
    if not Path(args.isic_sample).is_dir():
        sys.exit(f"ERROR: the ISIC sample folder {args.isic_sample} does not exist (--isic_sample)")

    if args.report_again:  # redo tables, plot and docs from a finished run's results.json
        saved = json.loads((work / "results.json").read_text())
        training, rows, wall = saved["training"], saved["predictions"], saved["wall_s"]
    else:
        training, rows, wall = _measure(args, work)
    chosen = {"sampler": "-", "dice": float("nan")}
    reference = [r for r in rows if r["sampler"] == args.reference]
    if reference:
        same_cases = [r for r in rows if r["trainer"] == args.sweep_trainer and r["subset"] == reference[0]["subset"]
                      and r is not reference[0]]
        chosen = choose_sampler(same_cases, reference[0])
    text, title = _report(args, argv, training, rows, chosen, wall)
    print("\n" + text)
    if args.docs:
        docs = Path(args.docs)
        _plot(rows, docs / f"isic_head_to_head_{args.budget}.png", title)
        _replace_section(docs / "benchmarks.md", f"isic_head_to_head:{args.budget}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
