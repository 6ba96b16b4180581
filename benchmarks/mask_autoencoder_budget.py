"""How many iterations the mask autoencoder stage needs to reconstruct the real ISIC masks at Dice 0.99, and
what the Dice + CE term on its decoded class scores buys (issue 13).

Each mask autoencoder trainer runs up to --epochs x --iters on fold 0 of the ISIC sample and stops early, as
in nnDiffSegTrainerLatent's stage, once the epoch's validation patches reconstruct at 0.99. Reported per
trainer: the iterations at which nnU-Net's pseudo Dice (validation patches) first reached 0.95, 0.98 and
0.99, the reconstruction Dice of the fold's whole validation masks at the end (nnU-Net's final validation of
decode(encode(mask))), seconds per iteration, and a curve of pseudo Dice against iterations.

    OMP_NUM_THREADS=1 python benchmarks/mask_autoencoder_budget.py --work_dir /tmp/mask_ae64 --max_size 64 \
        --epochs 40 --iters 25

Every training runs in its own process, one after the other, so their seconds compare.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_isic_sample_arguments, make_work_dir, run_child, seconds_per_train_iter, train_timed  # noqa: E402,I001
from latent_levers import PLANS, VARIANTS_DIR, _epoch_curve  # noqa: E402
from nndiffseg.visualization.figures import figure_style, save_figure  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DATASET_ID = 983  # isic_head_to_head._prepare converts the sample under this ID
TRAINERS = ("nnDiffSegTrainerMaskVAE", "nnDiffSegTrainerMaskVAE_noDice")
THRESHOLDS = (0.95, 0.98, 0.99)


def _child(args: argparse.Namespace, work: Path) -> dict:
    step, *rest = args._child
    if step == "prepare":
        from isic_head_to_head import _prepare
        return _prepare(work, Path(args.isic_sample), args.max_size, 0)
    return train_timed(DATASET_ID, rest[0], args.epochs, args.iters, plans=PLANS)


def _measure(args: argparse.Namespace, work: Path) -> dict:
    """Trains what results.json in the work folder does not hold yet (--resume goes on with it)."""
    saved = json.loads((work / "results.json").read_text()) if args.resume else None
    if saved is None:
        make_work_dir(work)
        saved = {"prepared": None, "rows": {}, "wall_s": 0.0}
    started = time.time() - saved["wall_s"]

    def save() -> None:
        saved["wall_s"] = time.time() - started
        (work / "results.json").write_text(json.dumps(saved, indent=1))

    os.environ["nnUNet_extTrainer"] = str(VARIANTS_DIR)
    options = ["--isic_sample", Path(args.isic_sample).resolve(), "--max_size", args.max_size,
               "--epochs", args.epochs, "--iters", args.iters]
    prepared = saved["prepared"] = saved["prepared"] or run_child(HERE, work, "prepare", options=options)
    saved["num_val"] = len(list(Path(prepared["labels"]).iterdir()))
    save()
    dataset_name = Path(prepared["dataset"]).name
    for trainer in args.trainers:
        fold = work / "nnUNet_results" / dataset_name / f"{trainer}__{PLANS}__2d" / "fold_0"
        if trainer in saved["rows"]:
            continue
        if not (fold / "validation" / "summary.json").is_file():
            print(f"training {trainer}: at most {args.epochs} epochs x {args.iters} iterations", flush=True)
            run_child(HERE, work, "train", trainer, options=options)
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        curve = _epoch_curve(work, "nnUNet_results", dataset_name, trainer)
        saved["rows"][trainer] = {
            "pseudo_dice": [d for _, d in curve], "reconstruction": summary["reconstruction_dice"],
            "s_per_iter": seconds_per_train_iter(work, dataset_name, trainer, args.iters, plans=PLANS)}
        save()
    return saved


def _first_reaching(dice: list, threshold: float, iters: int) -> str:
    return next((str((i + 1) * iters) for i, d in enumerate(dice) if d >= threshold), "not reached")


def report(saved: dict, args: argparse.Namespace, figure: Path) -> str:
    lines = [f"    OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/"
             f"mask_autoencoder_budget.py {' '.join(a for a in sys.argv[1:] if a != '--resume')}", "",
             f"ISIC 2017 sample, max_size {args.max_size}, fold 0 ({saved['num_val']} validation cases), at most "
             f"{args.epochs} x {args.iters} iterations, stopping once the epoch's validation patches reconstruct at "
             f"0.99. {os.cpu_count()} CPU cores; whole run {saved['wall_s'] / 60:.0f} min.", "",
             "| mask autoencoder trainer | iterations to pseudo Dice " + " / ".join(map(str, THRESHOLDS)) +
             " | iterations run | reconstruction Dice, whole validation masks | s / iter |",
             "| --- | --- | ---: | ---: | ---: |"]
    for trainer, row in saved["rows"].items():
        reached = " / ".join(_first_reaching(row["pseudo_dice"], t, args.iters) for t in THRESHOLDS)
        recon = ", ".join(f"{v:.4f}" for v in row["reconstruction"].values())
        lines.append(f"| {trainer} | {reached} | {len(row['pseudo_dice']) * args.iters} | {recon} | "
                     f"{row['s_per_iter']:.3f} |")
    lines += ["", f"![Mask autoencoder pseudo Dice against iterations]({figure.name})"]
    return "\n".join(lines)


def plot(saved: dict, args: argparse.Namespace, path: Path) -> None:
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for trainer, row in saved["rows"].items():
            ax.plot([(i + 1) * args.iters for i in range(len(row["pseudo_dice"]))], row["pseudo_dice"], marker="o",
                    markersize=3, label=trainer)
        ax.axhline(0.99, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training iterations")
        ax.set_ylabel("reconstruction Dice of the epoch's validation patches (pseudo Dice)")
        ax.set_title(f"Mask autoencoder on the ISIC sample, max_size {args.max_size}, fold 0")
        ax.set_ylim(max(0.0, min(min(r["pseudo_dice"]) for r in saved["rows"].values()) - 0.02), 1.0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_isic_sample_arguments(parser, REPO, max_size=64, epochs=40, iters=25)
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS))
    parser.add_argument("--figure", default=None, help="default: docs/mask_autoencoder_budget_<max_size>.png")
    parser.add_argument("--resume", action="store_true", help="go on with the work folder's results.json")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args._child:
        print(json.dumps(_child(args, work)))
        return 0
    saved = _measure(args, work)
    figure = Path(args.figure or REPO / "docs" / f"mask_autoencoder_budget_{args.max_size}.png")
    plot(saved, args, figure)
    text = report(saved, args, figure)
    (work / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
