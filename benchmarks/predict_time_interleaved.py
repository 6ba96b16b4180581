"""Per-image prediction time of trained models against nnUNetTrainer's, measured interleaved: every round
predicts each case with every model in turn, so a machine that gets busier or quieter during the run slows
all of them alike and the ratios stay fair. Network time only (nnU-Net's predictor, batch 1, no mirroring;
reading, preprocessing and export not timed), median over cases x rounds (the first round is warm-up).
For the latent trainers the time is also split by part (image encoder, denoiser, mask decoder).

    python benchmarks/predict_time_interleaved.py --work_dir /tmp/levers128 --trainers nnUNetTrainer \\
        nnDiffSegTrainerLatent --threads 1

The work folder is one that benchmarks/latent_levers.py (or isic_head_to_head.py) trained in.
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import nnunet_env  # noqa: E402

HERE = Path(__file__).resolve()
PARTS = {"image encoder": "image_encoder", "denoiser": "denoiser", "mask decoder": "mask_autoencoder"}


def _timed_parts(network, times: dict) -> None:
    """Adds each latent part's forward time to ``times[part]`` (the mask autoencoder only decodes here)."""
    for name, attribute in PARTS.items():
        module = getattr(network, attribute, None)
        if module is None:
            continue
        if attribute == "mask_autoencoder":
            decode = module.decode

            def timed_decode(*args, _decode=decode, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _decode(*args, **kwargs)
                finally:
                    times[_name] += time.perf_counter() - start
            module.decode = timed_decode
        else:
            module.register_forward_pre_hook(lambda m, a, _name=name: times.__setitem__("_" + _name,
                                                                                        time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, _name=name: times.__setitem__(
                _name, times[_name] + time.perf_counter() - times["_" + _name]))


def measure(work: Path, trainers: list, rounds: int, plans: str, dataset_id: int, images: Path) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nndiffseg.ext_trainer import register_ext_trainer_dir
    from nndiffseg.inference.predict import _resolve_model_folder, group_input_files
    register_ext_trainer_dir()
    predictors, parts = {}, {}
    for trainer in trainers:
        predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(_resolve_model_folder(dataset_id, trainer, plans, "2d")),
                                                       [0], "checkpoint_final.pth")
        parts[trainer] = defaultdict(float)
        _timed_parts(predictor.network, parts[trainer])
        predictors[trainer] = predictor
    first = predictors[trainers[0]]
    dataset_json = load_json(str(_resolve_model_folder(dataset_id, trainers[0], plans, "2d") / "dataset.json"))
    cases, _ = group_input_files(images, dataset_json["file_ending"])
    reader = first.plans_manager.image_reader_writer_class()
    preprocessor = first.configuration_manager.preprocessor_class(verbose=False)
    data = []
    for files in cases.values():
        image, properties = reader.read_images(files)
        image, _, _ = preprocessor.run_case_npy(image, None, properties, first.plans_manager,
                                                first.configuration_manager, dataset_json)
        data.append(torch.from_numpy(np.ascontiguousarray(image)))
    times = {t: [] for t in trainers}
    for r in range(rounds + 1):
        for image in data:
            for trainer in trainers:
                for p in parts[trainer]:
                    parts[trainer][p] = 0.0
                start = time.perf_counter()
                predictors[trainer].predict_logits_from_preprocessed_data(image)
                if r:
                    times[trainer].append((time.perf_counter() - start,
                                           {k: v for k, v in parts[trainer].items() if not k.startswith("_")}))
        print(f"round {r} of {rounds} done (round 0: warm-up)", file=sys.stderr, flush=True)
    result = {"shape": list(data[0].shape), "cases": len(data), "rounds": rounds, "threads": torch.get_num_threads(),
              "trainers": {}}
    for trainer in trainers:
        result["trainers"][trainer] = {
            "s_per_image": statistics.median(t for t, _ in times[trainer]),
            "parts": {p: statistics.median(d.get(p, 0.0) for _, d in times[trainer]) for p in PARTS
                      if any(p in d for _, d in times[trainer])}}
    return result


def report(result: dict, argv: list) -> str:
    trainers = list(result["trainers"])
    base = result["trainers"][trainers[0]]["s_per_image"]
    lines = ["    python benchmarks/predict_time_interleaved.py " + " ".join(argv), "",
             f"{result['cases']} cases (preprocessed shape {result['shape']}), {result['rounds']} "
             f"interleaved rounds after one warm-up round, {result['threads']} torch thread(s); median seconds "
             f"per image, network only.", "",
             "| model | s / image | x " + trainers[0] + " | image encoder | denoiser | mask decoder |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for trainer in trainers:
        row = result["trainers"][trainer]
        parts = [f"{row['parts'][p]:.3f}" if p in row["parts"] else "-" for p in PARTS]
        lines.append(f"| {trainer} | {row['s_per_image']:.3f} | {row['s_per_image'] / base:.2f} | "
                     + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="a folder benchmarks/latent_levers.py trained in")
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnDiffSegTrainerLatent"],
                        help="the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--plans", default="nnDiffSegPlans")
    parser.add_argument("--dataset_id", type=int, default=983, help="983: the ISIC sample as latent_levers.py "
                        "converts it; 984: its synthetic brain CT")
    parser.add_argument("--images", default=None, help="the images to predict (default: the work folder's "
                        "val_images, where latent_levers.py copies fold 0's validation cases)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    os.environ.update({k: v for k, v in nnunet_env(work).items() if k.startswith("nnUNet")})
    os.environ["nnUNet_extTrainer"] = str(HERE.parent / "latent_lever_trainers")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    images = Path(args.images) if args.images else work / "val_images"
    result = measure(work, args.trainers, args.rounds, args.plans, args.dataset_id, images)
    text = report(result, argv)
    (work / "predict_time.json").write_text(json.dumps(result, indent=1))
    (work / "predict_time.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
