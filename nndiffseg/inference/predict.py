"""``nnDiffSeg_predict``: nnU-Net's predictor over a folder, one case at a time with a progress bar; a case
that cannot be read or predicted is reported by name and the others still run."""
import argparse
import multiprocessing.pool
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import get_output_folder
from tqdm import tqdm

from nndiffseg.checkpoints import load_checkpoint_file
from nndiffseg.errors import NnDiffSegError, debugging, run_cli
from nndiffseg.ext_trainer import register_ext_trainer_dir
from nndiffseg.files import remove_partials
from nndiffseg.head import HeadOutput, draws_samples
from nndiffseg.inference.continuation import check_continuation, skip_predicted
from nndiffseg.inference.prediction_folder import (
    RECORD_FILES,
    SAMPLES_FOLDER,
    case_outputs,
    export_label_map,
    write_record,
)
from nndiffseg.inference.predictor import HeadPredictor
from nndiffseg.planning import PLANS_NAME
from nndiffseg.pools import quiet_pool, stop_pool
from nndiffseg.test_seam import HOOK_ENV, reached
from nndiffseg.utils import check_nnunet_paths, cpu_threads, dataset_name_from_id, name_list

# The trainers (diffusers, open_clip) and the uncertainty export are imported where they are used; the export
# workers import only nndiffseg.inference.prediction_folder


def group_input_files(input_folder: Path, file_ending: str) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """nnU-Net's naming: CASE_0000<ending>, CASE_0001<ending>, ... (an RGB PNG is one file holding three
    channels). Returns the cases with their channel files in order and, for malformed ones, why."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    channels: Dict[str, Dict[int, str]] = {}
    problems: Dict[str, str] = {}
    other_endings = []
    for f in sorted(os.listdir(input_folder)):
        if f.startswith(".") or f in RECORD_FILES or (input_folder / f).is_dir():
            continue
        if not f.endswith(file_ending):
            other_endings.append(f)
            continue
        m = pattern.match(f)
        if m is None:
            problems[f[:-len(file_ending)]] = f"file {f} lacks nnU-Net's channel suffix (_0000{file_ending})"
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = str(input_folder / f)
    cases = {}
    for case, files in channels.items():
        missing = [f"{case}_{c:04d}{file_ending}" for c in range(max(files)) if c not in files]
        if missing:
            problems[case] = f"missing channel file(s) {', '.join(missing)}"
        else:
            cases[case] = [files[c] for c in sorted(files)]
    if other_endings:
        print(f"WARNING: {len(other_endings)} file(s) in {input_folder} do not end in {file_ending} (the dataset's "
              f"file ending) and are not predicted: {name_list(other_endings)}", file=sys.stderr)
    return cases, problems


def read_case(reader, files: List[str], dataset_json: dict) -> Tuple[np.ndarray, dict]:
    """The case's image(s) as nnU-Net's reader gives them, refused where they do not fit the model or hold NaN or
    Inf (nnU-Net's normalization and the network pass them on: an all-NaN slice came out as a plausible lesion)."""
    data, properties = reader.read_images(files)
    num_channels = len(dataset_json["channel_names"])
    if data.shape[0] != num_channels:
        raise NnDiffSegError(f"image has {data.shape[0]} channel(s), the model takes {num_channels} "
                             f"({', '.join(dataset_json['channel_names'].values())})")
    if not np.isfinite(data).all():
        # one file per channel, or one file holding them all (an RGB PNG)
        per_file = zip(files, data) if len(files) == len(data) else [(files[0], data)]
        found = [f"{os.path.basename(f)}: {np.isnan(v).sum()} NaN, {np.isinf(v).sum()} Inf" for f, v in per_file
                 if not np.isfinite(v).all()]
        raise NnDiffSegError(f"the image holds values that are not numbers ({'; '.join(found)}): fix or leave out "
                             f"the case")
    return data, properties


def _wait(result: multiprocessing.pool.AsyncResult) -> None:
    """Wait for an export in short slices: Ctrl-C delivered to another thread (torch's, the pool's) is only
    acted on when the main thread runs bytecode, so one long blocking wait would hold it off until the export
    ends."""
    while not result.ready():
        result.wait(0.2)


def _initialize_predictor(predictor: nnUNetPredictor, model_folder: Path, folds: List[str],
                          checkpoint_name: str) -> None:
    """nnU-Net's loading, with an unreadable checkpoint named instead of torch's bare EOFError."""
    try:
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       checkpoint_name)
    except Exception:
        for f in folds:
            load_checkpoint_file(str(model_folder / f"fold_{f}" / checkpoint_name), "-chk")
        raise


def _resolve_model_folder(dataset_name_or_id, trainer: str, plans: str, configuration: str) -> Path:
    dataset_name = dataset_name_from_id(dataset_name_or_id)
    folder = Path(get_output_folder(dataset_name, trainer, plans, configuration))
    if not folder.is_dir():
        trained = sorted(p.name for p in folder.parent.iterdir()) if folder.parent.is_dir() else []
        raise NnDiffSegError(f"no trained model at {folder} (trained models of {dataset_name}: "
                             f"{', '.join(trained) or 'none'}); check -tr, -p and -c")
    return folder


def _check_folds(model_folder: Path, folds: Optional[Sequence[str]], checkpoint_name: str) -> List[str]:
    available = sorted(p.name[5:] for p in model_folder.glob("fold_*") if (p / checkpoint_name).is_file())
    if not folds:
        if not available:
            raise NnDiffSegError(f"no fold in {model_folder} has {checkpoint_name}")
        return available
    missing = [f for f in folds if f not in available]
    if missing:
        raise NnDiffSegError(f"fold(s) {', '.join(missing)} have no {checkpoint_name} in {model_folder} "
                             f"(folds with it: {', '.join(available) or 'none'})")
    return list(folds)


def apply_inference_options(network: torch.nn.Module, options: dict) -> None:
    """Prediction options (already checked by name in nndiffseg.registry) override the checkpoint's settings."""
    if options:
        try:
            network.set_inference_options(**options)
        except ValueError as e:
            raise NnDiffSegError(str(e)) from None


def predict_case(predictor: nnUNetPredictor, files: List[str], dataset_json: dict, uncertainty: bool = False,
                 samples: bool = False) -> Tuple[HeadOutput, dict]:
    """Read, preprocess and predict one case: its prediction in preprocessed space (the fields asked for; scores
    on the CPU) and nnU-Net's properties of the case, which the export needs."""
    reader = predictor.plans_manager.image_reader_writer_class()
    data, properties = read_case(reader, files, dataset_json)
    data, _, properties = predictor.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
        data, None, properties, predictor.plans_manager, predictor.configuration_manager, dataset_json)
    data = torch.from_numpy(data)
    if isinstance(predictor, HeadPredictor):
        return predictor.predict_head_output(data, uncertainty, samples), properties
    return HeadOutput(scores=predictor.predict_logits_from_preprocessed_data(data).cpu()), properties


def predict_folder(input_folder: str, output_folder: str, dataset_name_or_id, configuration: str, *,
                   trainer: str = "nnUNetTrainer", plans: str = PLANS_NAME, folds: Optional[Sequence[str]] = None,
                   checkpoint_name: str = "checkpoint_final.pth", device: str = "cuda", use_tta: Optional[bool] = None,
                   tile_step_size: float = 0.5, save_probabilities: bool = False, continue_prediction: bool = False,
                   num_processes_export: int = 2, inference_options: Optional[dict] = None,
                   save_uncertainty: bool = False, save_samples: bool = False,
                   calibration: bool = True, calibrate: bool = False) -> Dict[str, str]:
    """Predict every case in ``input_folder`` into ``output_folder``; returns {case: error} for the cases
    that failed (empty when all worked). ``use_tta`` None: the trainer's default (mirroring for nnU-Net's
    trainers; off for the iterative diffusion trainers, where it costs 4x). ``inference_options`` (e.g.
    {"steps": 10}) go to a diffusion network's ``set_inference_options``; networks without it refuse them.
    ``save_uncertainty``: also write the uncertainty per pixel (networks that sample: the guided
    trainers) under ``uncertainty/``; ``save_samples``: also each sample's label map, as the prediction folders
    ``samples/sample_K/``. Diffusion heads predict through ``HeadPredictor`` (the same label maps with or
    without these), nnU-Net's trainers through nnU-Net's predictor. ``calibration``: the probabilities are
    temperature-scaled where the model has a ``calibration.json`` (nnDiffSeg_calibrate; ``calibrate``: fitted first
    on these folds' validation probabilities); label maps are unchanged."""
    check_nnunet_paths("nnUNet_results")
    input_path, output_path = Path(input_folder), Path(output_folder)
    if not input_path.is_dir():
        raise NnDiffSegError(f"input folder {input_path} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise NnDiffSegError("the output folder must differ from the input folder")
    if output_path.exists() and not output_path.is_dir():
        raise NnDiffSegError(f"-o {output_path} is a file, not a folder")
    if not 0 < tile_step_size <= 1:
        raise NnDiffSegError(f"-step_size must be in (0, 1] (a fraction of the patch), got {tile_step_size}")
    if num_processes_export < 0:
        raise NnDiffSegError(f"-nps must be 0 (export in this process) or more, got {num_processes_export}")
    if device == "cuda" and not torch.cuda.is_available():
        raise NnDiffSegError("-device cuda but no CUDA GPU is available; use -device cpu")
    from nndiffseg.inference.uncertainty import export_samples, export_uncertainty
    from nndiffseg.registry import PREDICT, check_options, find_trainer_class
    trainer_class = find_trainer_class(trainer)
    options = check_options(trainer_class, inference_options or {}, PREDICT)
    head_class = getattr(trainer_class, "head_class", None)
    model_folder = _resolve_model_folder(dataset_name_or_id, trainer, plans, configuration)
    folds = _check_folds(model_folder, [str(f) for f in folds] if folds else None, checkpoint_name)
    for flag, wanted in (("--save_uncertainty", save_uncertainty), ("--save_samples", save_samples)):
        if wanted and not draws_samples(head_class) and len(folds) < 2:
            raise NnDiffSegError(f"{trainer} draws no samples: its folds are the samples, and fold {folds[0]} alone "
                                 f"has no {flag[7:]} to save; predict with several folds (-f 0 1 2 3 4)")

    from nndiffseg.evaluation.calibrate import calibrate_and_report, read_temperature
    if calibrate:
        calibrate_and_report(model_folder, folds, dataset_name_or_id, configuration, trainer, plans)
    temperature = read_temperature(model_folder) if calibration else None
    if save_probabilities and calibration and temperature is None:
        print(f"probabilities not temperature-scaled: {model_folder} has no calibration.json (--calibrate or "
              f"nnDiffSeg_calibrate fits one on the folds' validation probabilities)")
    dataset_json = load_json(str(model_folder / "dataset.json"))
    file_ending = dataset_json["file_ending"]
    cases, failures = group_input_files(input_path, file_ending)
    all_cases = list(cases)  # --continue_prediction drops those already done from ``cases``
    if not cases and not failures:
        raise NnDiffSegError(f"no {file_ending} images named CASE_0000{file_ending} in {input_path}")
    if use_tta is None:
        use_tta = getattr(trainer_class, "mirroring_at_prediction", True)
    record = {"input_folder": str(Path(input_folder).resolve()), "model_folder": str(model_folder), "trainer": trainer,
              "plans": plans, "configuration": configuration, "folds": folds, "checkpoint_name": checkpoint_name,
              "use_tta": use_tta, "tile_step_size": tile_step_size, "inference_options": options,
              "save_probabilities": save_probabilities, "save_uncertainty": save_uncertainty,
              "save_samples": save_samples, "temperature": temperature}
    if continue_prediction:
        check_continuation(output_path, record, file_ending)  # before anything is written
    remove_partials(output_path, recursive=True)  # from an interrupted earlier run

    register_ext_trainer_dir()
    predictor_class = HeadPredictor if head_class is not None or save_uncertainty or save_samples else nnUNetPredictor
    predictor = predictor_class(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_tta,
                                device=torch.device(device), allow_tqdm=False)
    _initialize_predictor(predictor, model_folder, folds, checkpoint_name)
    apply_inference_options(predictor.network, options)
    head = getattr(predictor.network, "_orig_mod", predictor.network)
    if continue_prediction:
        num_sample_maps = len(folds) * (head.setting("num_samples") if draws_samples(head_class) else 1) \
            if save_samples else 0
        skip_predicted(cases, output_path, predictor.plans_manager.image_reader_writer_class(),
                       lambda case: case_outputs(case, file_ending, save_probabilities, save_uncertainty,
                                                 num_sample_maps))
    output_path.mkdir(parents=True, exist_ok=True)  # only once the model and its options are accepted
    write_record(output_path, dataset_json, predictor.plans_manager.plans, record)
    geometry = (predictor.configuration_manager, predictor.plans_manager)
    if temperature is not None and save_probabilities:
        print(f"probabilities temperature-scaled with T = {temperature:.3f} ({model_folder}/calibration.json; "
              f"--no_calibration leaves them as the model gives them)")

    pending = []
    pool = quiet_pool(num_processes_export) if num_processes_export > 0 else None
    try:
        for case, files in tqdm(cases.items(), desc="Predicting", unit="case"):
            try:
                output, properties = predict_case(predictor, files, dataset_json, save_uncertainty, save_samples)
                scores = output.scores.numpy()
                if temperature is not None:  # softmax(scores / T), the argmax unchanged; in float32: nnU-Net's
                    scores = scores.astype(np.float32) / temperature  # float16 logits / a small T lose their margin
                args = (scores, properties, *geometry, dataset_json, str(output_path), case, save_probabilities)
                if pool is None or save_uncertainty or save_samples:  # the uncertainty picture draws the labels
                    if save_samples:  # before the label map, whose presence marks the case done
                        export_samples(output.samples, properties, *geometry, dataset_json, output_path, case)
                    export_label_map(*args)
                    if save_uncertainty:
                        export_uncertainty(output.uncertainty.numpy(), properties, *geometry, files, output_path,
                                           case, head.setting("uncertainty") if draws_samples(head_class) else "folds")
                else:
                    pending.append((case, pool.apply_async(export_label_map, args)))
                    if os.environ.get(HOOK_ENV):
                        _wait(pending[-1][1])  # the hook marks an exported case
                reached("case_exported")
            except Exception as e:  # one bad case must not stop the others
                failures[case] = f"{type(e).__name__}: {e} (files: {', '.join(files)})"
                tqdm.write(f"ERROR: case {case} failed: {failures[case]}", file=sys.stderr)
                if debugging():
                    traceback.print_exc()
        for case, result in pending:
            try:
                _wait(result)
                result.get()
            except Exception as e:
                failures[case] = f"export failed: {type(e).__name__}: {e}"
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:  # Ctrl-C (or a fault): stop the exports now; finished cases stay for --continue_prediction
        if pool is not None:
            stop_pool(pool)
        remove_partials(output_path, recursive=True)
        raise
    remove_partials(output_path, recursive=True)  # exports that failed (a full disk) in a worker
    for folder in sorted(output_path.glob(f"{SAMPLES_FOLDER}/sample_*")) if save_samples else []:
        write_record(folder, dataset_json, predictor.plans_manager.plans, {**record, "sample": folder.name})
    if save_samples:
        from nndiffseg.inference.case_confidence import write_case_confidence
        write_case_confidence(output_path, [c for c in all_cases if c not in failures], file_ending,
                              predictor.plans_manager.image_reader_writer_class())
    written = len(cases) - sum(c in cases for c in failures)
    print(f"Predicted {written} case(s) into {output_path}")
    if failures:
        print(f"{len(failures)} case(s) failed:", file=sys.stderr)
        for case, why in sorted(failures.items()):
            print(f"  {case}: {why}", file=sys.stderr)
    return failures


def predict_entry() -> None:
    parser = argparse.ArgumentParser(description="Predict a folder of images (nnU-Net naming: CASE_0000.png, ...) "
                                                 "with a trained model; fold models are ensembled as in nnU-Net.")
    parser.add_argument("-i", required=True, help="input folder")
    parser.add_argument("-o", required=True, help="output folder for the label maps")
    parser.add_argument("-d", required=True, help="dataset name or ID the model was trained on")
    parser.add_argument("-c", required=True, help="configuration, e.g. 2d")
    parser.add_argument("-tr", default="nnUNetTrainer", help="trainer class (default: nnUNetTrainer)")
    parser.add_argument("-p", default=PLANS_NAME, help=f"plans identifier (default: {PLANS_NAME})")
    parser.add_argument("-f", nargs="+", default=None,
                        help="folds to ensemble, e.g. 0 1 2 3 4 or all (default: every fold that has the checkpoint)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default: checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", help="cuda (default), cpu or mps")
    parser.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    parser.add_argument("-nps", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes for resampling/export (0: in this process)")
    parser.add_argument("--save_probabilities", action="store_true", help="also write class probabilities (.npz)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (4x faster in 2D)")
    tta.add_argument("--enable_tta", action="store_true",
                     help="mirroring test-time augmentation for trainers that leave it off by default (the guided "
                          "diffusion trainers)")
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument("--no_calibration", action="store_true",
                             help="export the probabilities as the model gives them, without the temperature of "
                                  "nnDiffSeg_calibrate (calibration.json in the model folder)")
    calibration.add_argument("--calibrate", action="store_true",
                             help="first fit the temperature on these folds' validation probabilities (nnDiffSeg_train "
                                  "... --npz), as nnDiffSeg_calibrate does, and write calibration.json")
    parser.add_argument("--continue_prediction", action="store_true",
                        help="skip cases whose output already exists (resume an interrupted run)")
    from nndiffseg.registry import PREDICT, add_option_groups
    names = add_option_groups(parser, PREDICT, "the checkpoint's")
    diffusion = parser.add_argument_group("diffusion trainers: outputs")
    diffusion.add_argument("--seed", dest="deprecated_seed", type=int, default=None, help=argparse.SUPPRESS)
    diffusion.add_argument("--save_samples", action="store_true",
                           help="also write each sample's label map; OUT/samples/sample_K/ is then a prediction folder "
                                "per sample (guided trainers: num_samples per fold; trainers that draw no samples, "
                                "nnU-Net's included: each fold's prediction is one sample), and "
                                "OUT/case_confidence.json: each case's mean Dice between its samples, least agreement "
                                "(check first) first")
    diffusion.add_argument("--save_uncertainty", action="store_true",
                           help="write the per-pixel uncertainty to OUT/uncertainty/CASE.npz, and for 2D images a "
                                "PNG with the prediction and the map (guided trainers: --uncertainty, pooled over "
                                "folds; trainers that draw no samples: the spread of their folds' probabilities)")
    args = parser.parse_args()

    def main() -> int:
        if args.device == "cpu":
            torch.set_num_threads(cpu_threads())
        options = {name: getattr(args, name) for name in names}
        if args.deprecated_seed is not None:
            print("WARNING: --seed is deprecated in nnDiffSeg_predict; use --sampling_seed", file=sys.stderr)
            options["seed"] = args.deprecated_seed if options["seed"] is None else options["seed"]
        failures = predict_folder(
            args.i, args.o, args.d, args.c, trainer=args.tr, plans=args.p, folds=args.f, checkpoint_name=args.chk,
            device=args.device, use_tta=False if args.disable_tta else (True if args.enable_tta else None),
            tile_step_size=args.step_size, save_probabilities=args.save_probabilities,
            continue_prediction=args.continue_prediction, num_processes_export=args.nps, inference_options=options,
            save_uncertainty=args.save_uncertainty, save_samples=args.save_samples,
            calibration=not args.no_calibration, calibrate=args.calibrate)
        return 1 if failures else 0

    run_cli(main)


if __name__ == "__main__":
    predict_entry()
