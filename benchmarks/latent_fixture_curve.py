"""Pseudo Dice per class against training time on the 3-class brain CT fixture (issue 13): nnUNetTrainer's
equal-time run against latent trainers trained in the same work folder of latent_levers.py --data stroke_fixture.

Training time is derived as in latent_levers.py: epochs x iterations x the median seconds per iteration of
that folder's side-by-side 12-epoch run (nnUNetTrainer's for nnU-Net; nnDiffSegTrainerLatent's for every latent
trainer, whose curves start after the mask autoencoder stage's time, shaded). One panel per lesion class.

    python benchmarks/latent_fixture_curve.py --work_dir /tmp/fixture64 --iters 25 \
        --latent "nnDiffSegTrainerLatent_long36=nnDiffSegTrainerLatent, 36 epochs" \
        "nnDiffSegTrainerLatent_fgWeight4=nnDiffSegTrainerLatent_fgWeight4, 12 epochs"
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_levers import (BASELINE, EQUAL_TIME, EQUAL_TIME_RESULTS, LATENT, MASK_STAGES,  # noqa: E402,I001
                           epoch_dice_per_class, trailing_mean, _train_s)
from nndiffseg.visualization.figures import figure_style, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ("ischemic", "hemorrhagic")


def curves(work: Path, latent_trainers: list, iters: int) -> tuple:
    """({label: [(derived training seconds, [pseudo Dice per class])] per epoch}, the stage's seconds)."""
    saved = json.loads((work / "results.json").read_text())
    training = saved["training"]
    if EQUAL_TIME not in training:
        raise SystemExit(f"ERROR: {work / 'results.json'} has no '{EQUAL_TIME}' run")
    dataset_name = Path(saved["prepared"]["dataset"]).name
    stage_s = _train_s(training, MASK_STAGES[0], iters)
    runs = [(f"{BASELINE} (equal-time run)", EQUAL_TIME_RESULTS, BASELINE, BASELINE, 0.0)]
    for spec in latent_trainers:
        trainer, _, label = spec.partition("=")
        runs.append((label or trainer, "nnUNet_results", trainer, LATENT, stage_s))
    out = {}
    for label, results, trainer, clock, offset in runs:
        _, dice = epoch_dice_per_class(work, results, dataset_name, trainer)
        if not dice:
            raise SystemExit(f"ERROR: no pseudo Dice in the training log of {trainer} under {work / results}")
        out[label] = [(offset + (i + 1) * iters * training[clock]["s_per_iter"], d) for i, d in enumerate(dice)]
    return out, stage_s


def plot(data: dict, stage_s: float, path: Path, title: str) -> None:
    with figure_style() as plt:
        fig, axes = plt.subplots(1, len(CLASS_NAMES), figsize=(13, 5), dpi=110, sharey=True)
        for k, (ax, name) in enumerate(zip(axes, CLASS_NAMES)):
            for label, points in data.items():
                minutes = [t / 60 for t, _ in points]
                d = [per_class[k] for _, per_class in points]
                line, = ax.plot(minutes, trailing_mean(d), linewidth=2, label=f"{label}: mean of the last 3 epochs")
                ax.plot(minutes, d, marker="o", markersize=3, linestyle=":", alpha=0.45, color=line.get_color())
            ax.axvspan(0, stage_s / 60, color="grey", alpha=0.12, label="latent trainers' mask autoencoder stage")
            ax.set_title(f"{title}: {name}")
            ax.set_xlabel("training time (min, derived: epochs x iterations x median s / iteration)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("nnU-Net's pseudo Dice (validation patches)")
        axes[-1].legend(fontsize=8, loc="lower right", framealpha=0.9)
        fig.tight_layout()
        save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="a finished latent_levers.py --data stroke_fixture run")
    parser.add_argument("--latent", nargs="+", default=[LATENT],
                        help="latent trainers trained in that folder, each as TRAINER or TRAINER=LABEL")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per epoch of that run (default: its results.json's; older runs lack it)")
    parser.add_argument("--figure", default=str(REPO / "docs" / "latent_fixture_curve.png"))
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if not (work / "results.json").is_file():
        print(f"ERROR: {work / 'results.json'} not found: give the work folder of a latent_levers.py run",
              file=sys.stderr)
        return 1
    saved = json.loads((work / "results.json").read_text())
    iters = args.iters or saved.get("iters")
    if not iters:
        print(f"ERROR: {work / 'results.json'} does not say the iterations per epoch: give --iters", file=sys.stderr)
        return 1
    data, stage_s = curves(work, args.latent, iters)
    title = "synthetic brain CT" + (f", {saved['max_size']} px" if "max_size" in saved else "")
    plot(data, stage_s, Path(args.figure), title)
    for label, points in data.items():
        t, last = points[-1]
        print(f"{label}: {len(points)} epochs, {t / 60:.1f} min, last pseudo Dice "
              + " / ".join(f"{name} {v:.3f}" for name, v in zip(CLASS_NAMES, last)))
    print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
