"""What the benchmark scripts share: each measurement in its own process (so peak memory is that step's
alone), timed prediction through nnU-Net's predictor, and training speed from nnU-Net's log."""
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def add_isic_sample_arguments(parser, repo: Path, max_size: int = 128, epochs: int = 12, iters: int = 25) -> None:
    """The options of the benchmarks that train on the real ISIC sample beside the repository."""
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--isic_sample", default=str(repo.parent / "shared" / "data" / "isic2017_sample"))
    parser.add_argument("--max_size", type=int, default=max_size)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--iters", type=int, default=iters)


def nnunet_env(work: Path) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(work / name)
    env.setdefault("nnUNet_n_proc_DA", "2")
    return env


def make_work_dir(work: Path) -> None:
    if work.exists() and any(work.iterdir()):
        sys.exit(f"ERROR: {work} is not empty; give a new --work_dir")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True)


def prepare_synthetic(work: Path, dataset_id: int, size: int, num_train: int, num_test: int) -> dict:
    """Synthetic dermoscopy cases at SIZE x SIZE in the ISIC 2016 layout, converted and planned."""
    from nndiffseg.dataset_conversion.isic import convert_isic
    from nndiffseg.demo.synthetic_dermoscopy import write_isic2016_layout
    from nndiffseg.planning.plan_and_preprocess import plan_and_preprocess
    source = write_isic2016_layout(work / "synthetic_isic2016", num_train, num_test, height=size, width=size)
    dataset = convert_isic(source, dataset_id, num_processes=1)
    plan_and_preprocess([dataset_id], ["2d"], num_processes=[2], num_processes_fingerprint=2)
    return {"dataset": str(dataset)}


def run_child(script: Path, work: Path, *args, options: Sequence[str] = ()) -> dict:
    """``script --work_dir WORK OPTIONS --_child ARGS`` in a fresh process; returns the JSON it prints last.
    OPTIONS are the parent's own command-line options, so that the child parses the same settings."""
    out = subprocess.run([sys.executable, str(script), "--work_dir", str(work), *map(str, options), "--_child",
                          *map(str, args)],
                         env=nnunet_env(work), stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"step {args} failed (exit {out.returncode}); its output:\n{out.stdout[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_mib(device: str = "cpu") -> float:
    """This process's peak memory: resident host memory, or on CUDA the GPU memory torch allocated."""
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_timed(dataset_id: int, trainer: str, epochs: int, iters: int, plans: str = "nnDiffSegPlans",
                options: Optional[dict] = None, device: str = "cpu", fold: int = 0) -> dict:
    from nndiffseg.run.train import train
    start = time.time()
    train(dataset_id, "2d", fold, trainer_name=trainer, plans_identifier=plans, device=device, num_epochs=epochs,
          iters_per_epoch=iters, trainer_options=options or {})
    return {"wall_s": time.time() - start, "peak_mib": peak_mib(device)}


def seconds_per_train_iter(work: Path, dataset_name: str, trainer: str, iters: int,
                           plans: str = "nnDiffSegPlans", results: str = "nnUNet_results", fold: int = 0) -> float:
    """Median epoch time / training iterations, from nnU-Net's log (first epoch left out: warm-up)."""
    fold = work / results / dataset_name / f"{trainer}__{plans}__2d" / f"fold_{fold}"
    times = [float(m) for log in sorted(fold.glob("training_log_*.txt"))
             for m in re.findall(r"Epoch time: ([\d.]+) s", log.read_text())]
    return statistics.median(times[1:] or times) / iters


def predict_timed(images: Path, labels: Path, out: Path, dataset_id: int, trainer: str,
                  options: Optional[dict] = None, plans: str = "nnDiffSegPlans", folds: Sequence = (0,),
                  device: str = "cpu") -> dict:
    """Predict every case of ``images`` with nnU-Net's predictor (batch 1, no mirroring), timing only the
    network part (preprocessing and export excluded); Dice from nnDiffSeg_evaluate against ``labels``."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nndiffseg.evaluation.evaluate import evaluate_folders
    from nndiffseg.ext_trainer import register_ext_trainer_dir
    from nndiffseg.inference.predict import (_resolve_model_folder, apply_inference_options, export_atomically,
                                             group_input_files)
    from nndiffseg.registry import PREDICT, check_options, find_trainer_class
    torch.set_num_threads(os.cpu_count() or 1)
    register_ext_trainer_dir()  # nnU-Net's predictor finds trainer classes by name
    folder = _resolve_model_folder(dataset_id, trainer, plans, "2d")
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), list(folds), "checkpoint_final.pth")
    apply_inference_options(predictor.network, check_options(find_trainer_class(trainer), options or {}, PREDICT))
    dataset_json = load_json(str(folder / "dataset.json"))
    cases, _ = group_input_files(images, dataset_json["file_ending"])
    out.mkdir(parents=True, exist_ok=True)
    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    times = []
    for case, files in cases.items():
        data, properties = reader.read_images(files)
        data, _, properties = preprocessor.run_case_npy(data, None, properties, predictor.plans_manager,
                                                        predictor.configuration_manager, dataset_json)
        data = torch.from_numpy(np.ascontiguousarray(data))
        start = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu().numpy()
        times.append(time.perf_counter() - start)
        export_atomically(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                          dataset_json, str(out), case, False)
    summary = evaluate_folders(str(labels), str(out), num_processes=1)
    return {"s_per_image": statistics.median(times[1:] or times), "dice": summary["mean"]["dice"],
            "iou": summary["mean"]["iou"], "tiou": summary["mean"]["tiou"], "peak_mib": peak_mib(device),
            "images": len(times), "case_dice": {c["case"]: c["mean"]["dice"] for c in summary["cases"]},
            "class_dice": {k: v["dice"] for k, v in summary.get("per_class", {}).items()}}
