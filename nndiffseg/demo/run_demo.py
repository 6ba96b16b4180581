"""``nnDiffSeg_demo``: the whole workflow on an embedded synthetic dataset, end to end on a CPU.

Synthetic dermoscopy cases in the ISIC 2016 release layout -> nnDiffSeg_convert_isic ->
nnDiffSeg_plan_and_preprocess -> nnDiffSeg_train (fold 0, a short run) -> nnDiffSeg_predict on the
held-out test cases (with uncertainty maps for the guided trainer) -> nnDiffSeg_evaluate -> overlay PNGs.
Everything is written below one folder, including the nnU-Net folders, so the user's own
nnUNet_raw/preprocessed/results are not touched.
"""
import argparse
import os
import shutil
import time
from pathlib import Path

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.files import write_text
from nndiffseg.inference.prediction_folder import UNCERTAINTY_FOLDER

DATASET_ID = 990
# The trainer the demo shows: the guided diffusion trainer, which also writes uncertainty maps. Its text
# encoder is a seeded random one, so the demo runs offline (CLIP ViT-B-32 would be a 600 MB download);
# --clip_model ViT-B-32:openai embeds the real prompts.
DEMO_TRAINER, DEMO_CLIP_MODEL = "nnDiffSegTrainerGuided", "random"
DEMO_NUM_TRAIN, DEMO_NUM_TEST = 48, 12
# 10 epochs: 12 took 609 s on a slow day (2026-12-03), over the 10 minutes the demo is meant to fit
DEMO_EPOCHS, DEMO_ITERS_PER_EPOCH = 10, 25
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
STAMP_FILE = ".nndiffseg_demo"  # marks a folder the demo wrote: --overwrite replaces no other


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def check_demo_arguments(out: Path, trainer: str, device: str, num_epochs: int, iters_per_epoch: int,
                         overwrite: bool, clip_model: str) -> bool:
    """Every argument checked before anything is written or removed; returns whether the trainer is guided.
    ``--overwrite`` replaces only a folder an earlier demo wrote (it holds the stamp file). The checks that need
    no torch come first, so that they answer at once."""
    if out.exists() and not out.is_dir():
        raise NnDiffSegError(f"-o {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / STAMP_FILE).is_file():
            raise NnDiffSegError(f"{out} is not empty and was not written by nnDiffSeg_demo (no {STAMP_FILE} in "
                                 f"it); choose another -o folder" + ("" if overwrite else ", or an empty one"))
        if not overwrite:
            raise NnDiffSegError(f"{out} is not empty; pass --overwrite to replace the earlier demo run")
    for flag, value in (("--num_epochs", num_epochs), ("--iters_per_epoch", iters_per_epoch)):
        if value < 1:
            raise NnDiffSegError(f"{flag} must be at least 1, got {value}")
    if device not in ("cpu", "cuda", "mps"):
        raise NnDiffSegError(f"-device must be cpu, cuda or mps, got '{device}'")
    import torch

    from nndiffseg.guided.text_prior import check_clip_model
    from nndiffseg.registry import find_trainer_class
    from nndiffseg.trainers.guided import nnDiffSegTrainerGuided

    if device == "cuda" and not torch.cuda.is_available():
        raise NnDiffSegError("-device cuda but no CUDA GPU is available; use -device cpu")
    guided = issubclass(find_trainer_class(trainer), nnDiffSegTrainerGuided)
    if guided:
        check_clip_model(clip_model)
    return guided


def run_demo(output_folder: str | Path = "demo_output", trainer: str = DEMO_TRAINER, device: str = "cpu",
             num_epochs: int = DEMO_EPOCHS, iters_per_epoch: int = DEMO_ITERS_PER_EPOCH,
             overwrite: bool = False, clip_model: str = DEMO_CLIP_MODEL) -> dict:
    """Run the demo below ``output_folder``; returns the evaluation summary."""
    out = Path(output_folder).resolve()
    for name in NNUNET_FOLDERS:  # before nnU-Net's modules are imported (they read these); nothing written yet
        os.environ[name] = str(out / name)
    guided = check_demo_arguments(out, trainer, device, num_epochs, iters_per_epoch, overwrite, clip_model)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # an earlier demo run (its stamp checked above)
    for name in NNUNET_FOLDERS:
        (out / name).mkdir(parents=True, exist_ok=True)
    write_text(out / STAMP_FILE, "written by nnDiffSeg_demo; nnDiffSeg_demo --overwrite may replace this folder\n")

    # imported after the nnU-Net folders are set, as nnU-Net's modules read them
    from nndiffseg.dataset_conversion.isic import convert_isic
    from nndiffseg.demo.synthetic_dermoscopy import write_isic2016_layout
    from nndiffseg.evaluation.evaluate import FIGURES_FOLDER, evaluate_folders, format_table, format_uncertainty_table
    from nndiffseg.inference.predict import predict_folder
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess
    from nndiffseg.run.train import train
    from nndiffseg.visualization.overlay import write_overlays

    start = time.time()
    _step(f"1/6 Synthetic dermoscopy data ({DEMO_NUM_TRAIN} training, {DEMO_NUM_TEST} test cases), ISIC 2016 layout")
    source = write_isic2016_layout(out / "synthetic_isic2016", DEMO_NUM_TRAIN, DEMO_NUM_TEST)
    print(f"written to {source}")

    _step("2/6 nnDiffSeg_convert_isic")
    dataset = convert_isic(source, DATASET_ID, num_processes=1)

    _step("3/6 nnDiffSeg_plan_and_preprocess")
    plans = plan_and_preprocess([DATASET_ID], ["2d"], num_processes=[1], num_processes_fingerprint=1)

    _step(f"4/6 nnDiffSeg_train {DATASET_ID} 2d 0 -tr {trainer} ({num_epochs} epochs x {iters_per_epoch} iterations)")
    train(DATASET_ID, "2d", 0, trainer_name=trainer, plans_identifier=plans, device=device, num_epochs=num_epochs,
          iters_per_epoch=iters_per_epoch, trainer_options={"clip_model": clip_model} if guided else None)

    _step("5/6 nnDiffSeg_predict on the held-out test cases")
    predictions = out / "predictions"
    failures = predict_folder(str(dataset / "imagesTs"), str(predictions), DATASET_ID, "2d", trainer=trainer,
                              plans=plans, folds=["0"], device=device, save_probabilities=True,
                              num_processes_export=0, save_uncertainty=guided)
    if failures:
        raise NnDiffSegError(f"prediction failed for {', '.join(failures)}")

    _step("6/6 nnDiffSeg_evaluate and overlays")
    summary = evaluate_folders(str(dataset / "labelsTs"), str(predictions), str(predictions / "summary.json"),
                               num_processes=1)
    print(format_table(summary))
    print(format_uncertainty_table(summary))
    overlays = write_overlays(dataset / "imagesTs", predictions, out / "overlays",
                              reference_folder=dataset / "labelsTs")

    print(f"\nDemo finished in {time.time() - start:.0f} s.")
    source = "spread" if guided else "entropy"
    detection = summary["uncertainty"][source]["all_labels"]
    measure = "the prior's and the samples' spread" if guided else "entropy of the softmax"
    print(f"  mean Dice on {len(summary['cases'])} held-out cases: {summary['mean']['dice']:.3f}; the uncertainty "
          f"({measure}) tells wrong pixels from right ones with AUROC {detection['pixel_auroc']:.3f} (0.5: chance, "
          f"1: perfect)")
    print(f"  predictions:  {predictions}")
    print(f"  summary:      {predictions / 'summary.json'} (figures: {predictions / FIGURES_FOLDER})")
    print(f"  overlays:     {out / 'overlays'} ({len(overlays)} PNGs: prediction yellow, reference green)")
    if guided:
        print(f"  uncertainty:  {predictions / UNCERTAINTY_FOLDER} (per pixel, .npz and PNG; "
              f"0: the prior is sure and all "
              f"samples agree)")
    print(f"  model:        {out / 'nnUNet_results'}")
    return summary


def demo_entry() -> None:
    parser = argparse.ArgumentParser(description="Run nndiffseg end to end on a small synthetic dermoscopy dataset.")
    parser.add_argument("-o", default="demo_output",
                        help="folder for everything the demo writes (default: demo_output)")
    parser.add_argument("-tr", default=DEMO_TRAINER, help=f"trainer (default: {DEMO_TRAINER})")
    parser.add_argument("-device", default="cpu", help="cpu (default), cuda or mps")
    parser.add_argument("--num_epochs", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--iters_per_epoch", type=int, default=DEMO_ITERS_PER_EPOCH)
    parser.add_argument("--clip_model", default=DEMO_CLIP_MODEL,
                        help=f"guided trainers: nnDiffSeg_train --clip_model (default: {DEMO_CLIP_MODEL}, no download)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in the folder")
    args = parser.parse_args()
    run_cli(lambda: run_demo(args.o, args.tr, args.device, args.num_epochs, args.iters_per_epoch, args.overwrite,
                             args.clip_model) and 0)


if __name__ == "__main__":
    demo_entry()
