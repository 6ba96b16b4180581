"""Single-step latent trainers against nnU-Net's baseline, side by side in one run.

On synthetic dermoscopy cases at SIZE x SIZE (one patch per image, so a prediction is one network call):
- training: seconds per training iteration (nnU-Net's epoch time / iterations per epoch) and peak memory
  of nnUNetTrainer, nnDiffSegTrainerMaskVAE + nnDiffSegTrainerLatent (compact) under the same budget, and of
  nnDiffSegTrainerLatent_sd for a few iterations (random weights: Stable Diffusion's cannot be downloaded
  here, and its parts cost the same time whatever the weights);
- prediction: seconds per image through nnU-Net's predictor (batch 1, no mirroring, preprocessing and
  export not timed), peak memory, and Dice on held-out cases, for the baseline and for the latent model at
  1 step (its default) and DDIM-10 / DDIM-50 on the same trained weights.

    python benchmarks/latent_vs_nnunet.py --work_dir /tmp/bench_latent

Every measurement runs in its own process, so peak memory (ru_maxrss) is that step's alone.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (make_work_dir, predict_timed, prepare_synthetic, run_child,  # noqa: E402
                    seconds_per_train_iter, train_timed)

DATASET_ID = 981
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- the table
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="scratch folder (nnU-Net folders, predictions)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--num_train", type=int, default=40)
    parser.add_argument("--num_test", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="training budget, same for every trainer")
    parser.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--sd_iters", type=int, default=3, help="iterations per epoch for the sd timing run (2 epochs)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 50], help="latent sampling steps to compare")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()

    if args._child:
        step, *rest = args._child
        if step == "prepare":
            result = prepare_synthetic(work, DATASET_ID, *map(int, rest))
        elif step == "train":
            options = {"sd_weights": "random"} if rest[0].endswith("_sd") else {}
            result = train_timed(DATASET_ID, rest[0], int(rest[1]), int(rest[2]), options=options)
        else:
            dataset, trainer, steps = Path(rest[0]), rest[1], int(rest[2])
            result = predict_timed(dataset / "imagesTs", dataset / "labelsTs", work / "predictions" /
                                   f"{trainer}_steps{steps}", DATASET_ID, trainer,
                                   None if trainer == "nnUNetTrainer" else {"steps": steps})
        print(json.dumps(result))
        return 0

    make_work_dir(work)
    started = time.time()
    dataset = run_child(HERE, work, "prepare", args.size, args.num_train, args.num_test)["dataset"]

    runs = [("nnUNetTrainer", args.epochs, args.iters), ("nnDiffSegTrainerMaskVAE", args.epochs, args.iters),
            ("nnDiffSegTrainerLatent", args.epochs, args.iters), ("nnDiffSegTrainerLatent_sd", 2, args.sd_iters)]
    training = {}
    for trainer, epochs, iters in runs:
        print(f"training {trainer}: {epochs} epochs x {iters} iterations", flush=True)
        training[trainer] = run_child(HERE, work, "train", trainer, epochs, iters)
        training[trainer]["s_per_iter"] = seconds_per_train_iter(work, Path(dataset).name, trainer, iters)

    predictions = [("nnUNetTrainer", 1)] + [("nnDiffSegTrainerLatent", s) for s in args.steps] + \
                  [("nnDiffSegTrainerLatent_sd", 1)]
    results = []
    for trainer, steps in predictions:
        print(f"predicting with {trainer}, {steps} step(s)", flush=True)
        results.append((trainer, steps, run_child(HERE, work, "predict", dataset, trainer, steps)))

    base_pred = results[0][2]["s_per_image"]
    base_train = training["nnUNetTrainer"]["s_per_iter"]
    print(f"\n{args.size}x{args.size} synthetic dermoscopy, {args.num_train} training / {args.num_test} test cases, "
          f"budget {args.epochs} epochs x {args.iters} iterations (Latent_sd: 2 x {args.sd_iters}, random weights, "
          f"Dice not meaningful); {os.cpu_count()} CPU cores; total {time.time() - started:.0f} s\n")
    print("| model | steps | Dice | s / image | x baseline | peak MiB (predict) | s / train iter | x baseline | "
          "peak MiB (train) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for trainer, steps, r in results:
        t = training[trainer]
        dice = "n/a" if trainer.endswith("_sd") else f"{r['dice']:.3f}"
        print(f"| {trainer} | {steps} | {dice} | {r['s_per_image']:.3f} | {r['s_per_image'] / base_pred:.2f} | "
              f"{r['peak_mib']:.0f} | {t['s_per_iter']:.3f} | {t['s_per_iter'] / base_train:.2f} | {t['peak_mib']:.0f} |")
    vae = training["nnDiffSegTrainerMaskVAE"]
    print(f"| nnDiffSegTrainerMaskVAE (stage 1) | | | | | | {vae['s_per_iter']:.3f} | "
          f"{vae['s_per_iter'] / base_train:.2f} | {vae['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
