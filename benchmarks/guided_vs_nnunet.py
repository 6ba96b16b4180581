"""Speed of the guided diffusion trainer against nnU-Net's baseline, side by side in one run, on synthetic
dermoscopy cases at SIZE x SIZE (one patch per image, so a prediction is one network call of nnU-Net's
predictor):
- training: seconds per training iteration and peak memory of nnUNetTrainer and nnDiffSegTrainerGuided
  under the same budget (epochs x iterations);
- prediction: seconds per image (nnU-Net's predictor, batch 1, no mirroring; preprocessing and export not
  timed), peak memory and Dice on the test cases, for the baseline and for the guided model with each
  --samplers setting (K samples each) on the same trained weights.
DDPM-1000 x K costs 1000 denoiser calls per image (over half an hour at 256 x 256 on 2 cores), so its row is
extrapolated from two measured settings with different step counts: a sampler's time is the prior's and the
text's once per image plus the same denoiser call (K samples batched) per step, t(S) = a + b S.
The sampler defaults are chosen on the real ISIC sample by benchmarks/isic_head_to_head.py.

    python benchmarks/guided_vs_nnunet.py --work_dir /tmp/bench_guided
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

DATASET_ID = 982
HERE = Path(__file__).resolve()
GUIDED = "nnDiffSegTrainerGuided"


def extrapolate(measured: dict[int, float], steps: int) -> float:
    """t(steps) from the straight line through the two measured (steps, seconds) points furthest apart."""
    (s0, t0), (s1, t1) = min(measured.items()), max(measured.items())
    per_step = (t1 - t0) / (s1 - s0)
    return t0 + (steps - s0) * per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="scratch folder (nnU-Net folders, predictions)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--num_train", type=int, default=40)
    parser.add_argument("--num_test", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="training budget, same for both trainers")
    parser.add_argument("--iters", type=int, default=10, help="training iterations per epoch")
    parser.add_argument("--samples", type=int, default=5, help="samples per image (K)")
    parser.add_argument("--samplers", nargs="+", default=["ddim:20", "ddpm:50"],
                        help="SAMPLER:STEPS settings to time; two step counts give the DDPM-1000 row")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()

    if args._child:
        step, *rest = args._child
        if step == "prepare":
            result = prepare_synthetic(work, DATASET_ID, args.size, args.num_train, args.num_test)
        elif step == "train":
            result = train_timed(DATASET_ID, rest[0], args.epochs, args.iters,
                                 options={"clip_model": "random"} if rest[0] == GUIDED else None)
        else:
            trainer, dataset, sampler = rest[0], Path(rest[1]), rest[2]
            options = None
            if trainer == GUIDED:
                name, steps = sampler.split(":")
                options = {"sampler": name, "steps": int(steps), "num_samples": args.samples}
            result = predict_timed(dataset / "imagesTs", dataset / "labelsTs",
                                   work / "predictions" / f"{trainer}_{sampler.replace(':', '')}", DATASET_ID,
                                   trainer, options)
        print(json.dumps(result))
        return 0

    make_work_dir(work)
    started = time.time()
    forwarded = ["--size", args.size, "--num_train", args.num_train, "--num_test", args.num_test, "--epochs",
                 args.epochs, "--iters", args.iters, "--samples", args.samples]
    dataset = Path(run_child(HERE, work, "prepare", options=forwarded)["dataset"])
    training = {}
    for trainer in ("nnUNetTrainer", GUIDED):
        print(f"training {trainer}: {args.epochs} epochs x {args.iters} iterations", flush=True)
        training[trainer] = run_child(HERE, work, "train", trainer, options=forwarded)
        training[trainer]["s_per_iter"] = seconds_per_train_iter(work, dataset.name, trainer, args.iters)
    results = []
    for trainer, sampler in [("nnUNetTrainer", "-")] + [(GUIDED, s) for s in args.samplers]:
        print(f"predicting with {trainer} {sampler}", flush=True)
        results.append((trainer, sampler, run_child(HERE, work, "predict", trainer, dataset, sampler,
                                                    options=forwarded)))

    base_pred = results[0][2]["s_per_image"]
    base_train = training["nnUNetTrainer"]["s_per_iter"]
    print(f"\n{args.size}x{args.size} synthetic dermoscopy, {args.num_train} training / {args.num_test} test cases, "
          f"budget {args.epochs} epochs x {args.iters} iterations, K = {args.samples} samples; "
          f"{os.cpu_count()} CPU cores; total {time.time() - started:.0f} s\n")
    print("| model | sampler | Dice | s / image | x baseline | peak MiB (predict) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for trainer, sampler, r in results:
        print(f"| {trainer} | {sampler} | {r['dice']:.3f} | {r['s_per_image']:.2f} | "
              f"{r['s_per_image'] / base_pred:.1f} | {r['peak_mib']:.0f} |")
    measured = {int(s.split(":")[1]): r["s_per_image"] for _, s, r in results[1:]}
    if len(measured) >= 2:
        t = extrapolate(measured, 1000)
        print(f"| {GUIDED} | ddpm:1000 (extrapolated, t = a + b S) | | {t:.0f} | {t / base_pred:.0f} | |")
    print("\n| trainer | s / train iter | x baseline | peak MiB (train) |")
    print("| --- | ---: | ---: | ---: |")
    for trainer, t in training.items():
        print(f"| {trainer} | {t['s_per_iter']:.3f} | {t['s_per_iter'] / base_train:.2f} | {t['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
