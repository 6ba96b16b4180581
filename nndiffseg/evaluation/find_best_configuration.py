"""``nnDiffSeg_find_best_configuration``: nnU-Net's model selection (cross-validation Dice of each trainer and
configuration, ensembles of two, postprocessing) over our trainers and nnU-Net's, with nnU-Net's arguments.

The selection is nnunetv2's own ``find_best_configuration``; what this adds: the trained folds are checked
before any work (a missing fold, an unfinished final validation or, for ensembling, missing ``--npz``
probabilities are named with the command that fixes them), and the inference instructions it prints and writes
name nndiffseg's tools, which find our trainers without ``nnUNet_extTrainer``; a cross-validation summary (table
and box plot, nndiffseg.evaluation.crossval_summary) is written beside them."""
import argparse
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable, List, Sequence
from unittest import mock

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.evaluation.crossval_summary import write_crossval_summary
from nndiffseg.files import write_text
from nndiffseg.planning import PLANS_NAME
from nndiffseg.utils import check_nnunet_paths, dataset_name_from_id

# nnU-Net's commands in its instructions, and ours that take the same arguments
OUR_TOOLS = {"nnUNetv2_predict": "nnDiffSeg_predict", "nnUNetv2_ensemble": "nnDiffSeg_ensemble",
             "nnUNetv2_apply_postprocessing": "nnDiffSeg_apply_postprocessing"}


def check_trained_folds(dataset_name: str, models: Sequence[dict], folds: Sequence[int], ensembling: bool) -> None:
    """Every model has every fold trained and validated as nnU-Net's selection needs it."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nndiffseg.registry import find_trainer_class
    for m in models:
        trainer, plans, configuration = m["trainer"], m["plans"], m["configuration"]
        if getattr(find_trainer_class(trainer), "is_training_stage", False):
            raise NnDiffSegError(f"{trainer} trains a stage of another trainer, not a segmentation model: select "
                                 f"the trainer it serves instead")
        folder = Path(get_output_folder(dataset_name, trainer, plans, configuration))
        train = f"nnDiffSeg_train {dataset_name} {configuration} FOLD -tr {trainer} -p {plans} --npz"
        if not folder.is_dir():
            raise NnDiffSegError(f"no trained model at {folder}: train folds {' '.join(map(str, folds))} first "
                                 f"({train})")
        for f in folds:
            summary = folder / f"fold_{f}" / "validation" / "summary.json"
            if not summary.is_file():
                raise NnDiffSegError(f"{summary} not found: fold {f} of {folder.name} has not finished its training "
                                     f"and final validation ({train.replace('FOLD', str(f))})")
            if "foreground_mean" not in json.loads(summary.read_text()):
                raise NnDiffSegError(f"{summary} has no foreground_mean: not a segmentation model's validation")
            if ensembling and len(models) > 1 and not any(summary.parent.glob("*.npz")):
                raise NnDiffSegError(f"fold {f} of {folder.name} saved no probabilities, which ensembling needs: "
                                     f"nnDiffSeg_train {dataset_name} {configuration} {f} -tr {trainer} -p {plans} "
                                     f"--val --npz writes them without training again (or pass --disable_ensembling)")


def instructions_naming_our_tools(nnunet_instructions: Callable) -> Callable:
    """A replacement for nnU-Net's print_inference_instructions that prints and writes its text with our tools'
    names (their arguments are the same)."""
    def print_inference_instructions(inference_info_dict: dict, instructions_file: str = None) -> None:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            nnunet_instructions(inference_info_dict, None)
        text = text.getvalue()
        for theirs, ours in OUR_TOOLS.items():
            text = text.replace(f"{theirs} ", f"{ours} ")
        print(text)
        if instructions_file is not None:
            write_text(instructions_file, text.strip() + "\n")
    return print_inference_instructions


def find_best_configuration(dataset_name_or_id, trainers: List[str], configurations: List[str], plans: List[str],
                            folds: Sequence[int] = (0, 1, 2, 3, 4), num_processes: int = 2, ensembling: bool = True,
                            overwrite: bool = True) -> dict:
    """nnunetv2's find_best_configuration after the checks; returns its inference information."""
    check_nnunet_paths("nnUNet_preprocessed", "nnUNet_results")
    if num_processes < 1:
        raise NnDiffSegError(f"-np must be at least 1, got {num_processes}")
    dataset_name = dataset_name_from_id(dataset_name_or_id)
    from nnunetv2.evaluation import find_best_configuration as nnunet
    models = nnunet.dumb_trainer_config_plans_to_trained_models_dict(trainers, configurations, plans)
    for p in plans:
        plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / f"{p}.json"
        if not plans_file.is_file():
            raise NnDiffSegError(f"plans file {plans_file} not found; check -p")
        available = json.loads(plans_file.read_text())["configurations"]
        missing = [c for c in configurations if c not in available]
        if missing:
            raise NnDiffSegError(f"configuration(s) {', '.join(missing)} not in {plans_file.name} "
                                 f"(it has {', '.join(available)}); check -c")
    check_trained_folds(dataset_name, models, folds, ensembling)
    # nnU-Net calls print_inference_instructions by its module-level name: replaced while this runs
    with mock.patch.object(nnunet, "print_inference_instructions",
                           instructions_naming_our_tools(nnunet.print_inference_instructions)):
        info = nnunet.find_best_configuration(dataset_name, models, allow_ensembling=ensembling,
                                              num_processes=num_processes, overwrite=overwrite, folds=tuple(folds),
                                              strict=True)
    gt_folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "gt_segmentations"
    write_crossval_summary(Path(os.environ["nnUNet_results"]) / dataset_name, info, gt_folder, num_processes)
    calibrate_models(dataset_name, models, folds, gt_folder)
    return info


def calibrate_models(dataset_name: str, models: Sequence[dict], folds: Sequence[int], gt_folder: Path) -> None:
    """nnDiffSeg_calibrate for every label-based model whose folds all kept their validation probabilities."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nndiffseg.evaluation.calibrate import calibrate_model, ece_rose
    for m in models:
        folder = Path(get_output_folder(dataset_name, m["trainer"], m["plans"], m["configuration"]))
        if not all(any((folder / f"fold_{f}" / "validation").glob("*.npz")) for f in folds):
            print(f"{folder.name}: not calibrated (its folds' validation kept no probabilities: --npz)")
            continue
        try:
            result = calibrate_model(folder, gt_folder, [str(f) for f in folds], lambda fold: "")
        except NnDiffSegError as e:
            print(f"{folder.name}: not calibrated ({e})")
            continue
        print(f"{folder.name}: temperature {result['temperature']:.3f} written to calibration.json "
              f"(nnDiffSeg_predict applies it to the probabilities)")
        if note := ece_rose(result):
            print(f"{folder.name}: {note}")


def find_best_configuration_entry() -> None:
    parser = argparse.ArgumentParser(description="nnU-Net's model selection over cross-validated trainers (ours and "
                                                 "nnU-Net's): the best single model or ensemble of two, its "
                                                 "postprocessing, and how to predict with it")
    parser.add_argument("dataset_name_or_id", help="dataset name or ID")
    parser.add_argument("-p", nargs="+", default=[PLANS_NAME], help=f"plans identifiers (default: {PLANS_NAME})")
    parser.add_argument("-c", nargs="+", default=["2d"], help="configurations (default: 2d; the diffusion "
                                                              "trainers are 2D)")
    parser.add_argument("-tr", nargs="+", default=["nnUNetTrainer"], help="trainers (default: nnUNetTrainer)")
    parser.add_argument("-np", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes for ensembling, evaluation and postprocessing")
    parser.add_argument("-f", nargs="+", type=int, default=(0, 1, 2, 3, 4), help="folds (default: 0 1 2 3 4)")
    parser.add_argument("--disable_ensembling", action="store_true", help="only single models")
    parser.add_argument("--no_overwrite", action="store_true", help="reuse ensembles computed by an earlier run")
    args = parser.parse_args()

    def main() -> None:
        find_best_configuration(args.dataset_name_or_id, args.tr, args.c, args.p, args.f, args.np,
                                not args.disable_ensembling, not args.no_overwrite)

    run_cli(main)


if __name__ == "__main__":
    find_best_configuration_entry()
