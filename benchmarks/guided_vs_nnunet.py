"""The guided diffusion trainer against nnU-Net's baseline, side by side in one run, and the choice of its
sampler defaults.

On synthetic dermoscopy cases at SIZE x SIZE (one patch per image, so a prediction is one network call of
the predictor), or on the real ISIC sample with --isic_sample:
- training: seconds per training iteration and peak memory of nnUNetTrainer and nnDiffSegTrainerGuided
  under the same budget (epochs x iterations);
- prediction: seconds per image through nnU-Net's predictor (batch 1, no mirroring; preprocessing and
  export not timed), peak memory and Dice on held-out cases, for the baseline and for the guided model with
  each sampler setting (SAMPLER:STEPS, K samples each) on the same trained weights; DDPM-1000 x K, the
  reference the defaults are chosen against, runs on the first --ddpm_images images only when that is
  fewer than all (it costs 1000 denoiser calls per image).

    python benchmarks/guided_vs_nnunet.py --work_dir /tmp/bench_guided
    python benchmarks/guided_vs_nnunet.py --work_dir /tmp/bench_guided_isic --isic_sample ../shared/data/isic2017_sample
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_work_dir, predict_timed, run_child, seconds_per_train_iter, train_timed  # noqa: E402

DATASET_ID = 982
HERE = Path(__file__).resolve()
GUIDED = "nnDiffSegTrainerGuided"


def _prepare(work: Path, size: int, num_train: int, num_test: int, isic_sample: str) -> dict:
    """The dataset, and the held-out images and labels to predict: the synthetic test split, or fold 0's
    validation cases of the ISIC sample."""
    import os

    from nndiffseg.dataset_conversion.isic import convert_isic
    from nndiffseg.demo.synthetic_dermoscopy import write_isic2016_layout
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess
    if isic_sample:
        dataset = convert_isic(isic_sample, DATASET_ID, max_size=size, num_processes=2)
    else:
        source = write_isic2016_layout(work / "synthetic_isic2016", num_train, num_test, height=size, width=size)
        dataset = convert_isic(source, DATASET_ID, num_processes=1)
    plan_and_preprocess([DATASET_ID], ["2d"], num_processes=[2], num_processes_fingerprint=2)
    images, labels = dataset / "imagesTs", dataset / "labelsTs"
    if isic_sample:  # fold 0's validation cases (nnU-Net's splits, made here as training would make them)
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        cases = sorted(f.name[:-len(".png")] for f in (dataset / "labelsTr").glob("*.png"))
        splits = generate_crossval_split(cases, seed=12345, n_splits=5)
        preprocessed = Path(os.environ["nnUNet_preprocessed"]) / dataset.name
        (preprocessed / "splits_final.json").write_text(json.dumps(splits))
        images, labels = work / "val_images", work / "val_labels"
        images.mkdir()
        labels.mkdir()
        for case in splits[0]["val"]:
            shutil.copy(dataset / "imagesTr" / f"{case}_0000.png", images)
            shutil.copy(dataset / "labelsTr" / f"{case}.png", labels)
    return {"dataset": str(dataset), "images": str(images), "labels": str(labels)}


def _subset(images: Path, labels: Path, n: int, target: Path) -> tuple:
    (target / "images").mkdir(parents=True, exist_ok=True)
    (target / "labels").mkdir(exist_ok=True)
    for f in sorted(labels.glob("*.png"))[:n]:
        shutil.copy(f, target / "labels")
        shutil.copy(images / f.name.replace(".png", "_0000.png"), target / "images")
    return target / "images", target / "labels"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="scratch folder (nnU-Net folders, predictions)")
    parser.add_argument("--isic_sample", default=None, help="the ISIC 2017 sample folder instead of synthetic data")
    parser.add_argument("--size", type=int, default=256, help="image side (synthetic) or --max_size (ISIC)")
    parser.add_argument("--num_train", type=int, default=40)
    parser.add_argument("--num_test", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="training budget, same for both trainers")
    parser.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--samples", type=int, default=5, help="samples per image (K)")
    parser.add_argument("--samplers", nargs="+", default=["ddim:5", "ddim:10", "ddim:20", "ddim:50", "dpmsolver:5",
                                                          "dpmsolver:10", "dpmsolver:20"])
    parser.add_argument("--ddpm_images", type=int, default=2, help="images for the DDPM-1000 reference (0: skip)")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()

    if args._child:
        step, *rest = args._child
        if step == "prepare":
            result = _prepare(work, args.size, args.num_train, args.num_test, args.isic_sample)
        elif step == "train":
            result = train_timed(DATASET_ID, rest[0], args.epochs, args.iters,
                                 options={"clip_model": "random"} if rest[0] == GUIDED else None)
        else:
            trainer, images, labels, out = rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3])
            options = None
            if trainer == GUIDED:
                sampler, steps = rest[4].split(":")
                options = {"sampler": sampler, "steps": int(steps), "num_samples": args.samples}
            result = predict_timed(images, labels, out, DATASET_ID, trainer, options)
        print(json.dumps(result))
        return 0

    make_work_dir(work)
    started = time.time()
    prepared = run_child(HERE, work, "prepare")
    dataset, images, labels = Path(prepared["dataset"]), Path(prepared["images"]), Path(prepared["labels"])
    training = {}
    for trainer in ("nnUNetTrainer", GUIDED):
        print(f"training {trainer}: {args.epochs} epochs x {args.iters} iterations", flush=True)
        training[trainer] = run_child(HERE, work, "train", trainer)
        training[trainer]["s_per_iter"] = seconds_per_train_iter(work, dataset.name, trainer, args.iters)

    runs = [("nnUNetTrainer", "-", images, labels)] + [(GUIDED, s, images, labels) for s in args.samplers]
    if args.ddpm_images:
        n_all = len(list(labels.glob("*.png")))
        sub = (images, labels) if args.ddpm_images >= n_all else _subset(images, labels, args.ddpm_images,
                                                                         work / "ddpm_subset")
        runs += [(GUIDED, s, *sub) for s in args.samplers] if args.ddpm_images < n_all else []
        runs.append((GUIDED, "ddpm:1000", *sub))
    results = []
    for trainer, sampler, imgs, labs in runs:
        subset = "" if imgs == images else f" (first {args.ddpm_images} images)"
        print(f"predicting with {trainer} {sampler}{subset}", flush=True)
        out = work / "predictions" / f"{trainer}_{sampler.replace(':', '')}{'_subset' if subset else ''}"
        results.append((trainer, sampler, subset, run_child(HERE, work, "predict", trainer, imgs, labs, out, sampler)))

    base_pred = results[0][3]["s_per_image"]
    base_train = training["nnUNetTrainer"]["s_per_iter"]
    source = f"ISIC sample (max_size {args.size})" if args.isic_sample else f"{args.size}x{args.size} synthetic dermoscopy"
    print(f"\n{source}, budget {args.epochs} epochs x {args.iters} iterations, K = {args.samples} samples; "
          f"total {time.time() - started:.0f} s\n")
    print("| model | sampler | images | Dice | s / image | x baseline | peak MiB (predict) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for trainer, sampler, subset, r in results:
        print(f"| {trainer} | {sampler} | {r['images']}{subset and ' (subset)'} | {r['dice']:.4f} | "
              f"{r['s_per_image']:.2f} | {r['s_per_image'] / base_pred:.1f} | {r['peak_mib']:.0f} |")
    print("\n| trainer | s / train iter | x baseline | peak MiB (train) |")
    print("| --- | ---: | ---: | ---: |")
    for trainer, t in training.items():
        print(f"| {trainer} | {t['s_per_iter']:.3f} | {t['s_per_iter'] / base_train:.2f} | {t['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
