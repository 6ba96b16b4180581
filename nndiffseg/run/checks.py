"""nnDiffSeg_train's checks that need the file system: the fold against the dataset's splits and cases, the
preprocessed data against dataset.json, an earlier run in the fold folder, and the method options' values (by the
checks their trainer declares), all before a trainer (and its fold folder) exists."""
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from batchgenerators.utilities.file_and_folder_operations import load_json

from nndiffseg.checkpoints import CONTINUE_CHECKPOINTS, load_checkpoint_file
from nndiffseg.errors import NnDiffSegError
from nndiffseg.planning import PLANS_NAME

NNUNET_FOLDS = 5


def load_plans(dataset_name: str, plans_identifier: str) -> dict:
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        found = sorted(p.stem for p in folder.glob("*Plans*.json")) if folder.is_dir() else []
        raise NnDiffSegError(f"plans file {plans_file} not found (plans available: {', '.join(found) or 'none'}); "
                             f"run nnDiffSeg_plan_and_preprocess -d ID first, or pass -p PLANS")
    return load_json(str(plans_file))


def parse_fold(fold: Union[int, str]) -> Union[int, str]:
    if fold == "all":
        return fold
    try:
        value = int(fold)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 0:
        raise NnDiffSegError(f"FOLD must be 0-4 (nnU-Net's 5-fold cross-validation) or 'all', got '{fold}'")
    return value


def check_fold(dataset_name: str, fold: Union[int, str]) -> None:
    """The fold must exist: in the dataset's splits_final.json when there is one, else among nnU-Net's five
    (a fold beyond them would train on a random 80:20 split and later join the fold ensembles). Its
    validation set must not be empty (nnU-Net's loop would crash on it)."""
    if fold == "all":
        return
    splits_file = Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "splits_final.json"
    if not splits_file.is_file():
        if fold >= NNUNET_FOLDS:
            raise NnDiffSegError(f"FOLD must be 0-{NNUNET_FOLDS - 1} (nnU-Net's 5-fold cross-validation) or 'all', "
                                 f"got {fold}")
        return
    try:
        splits = json.loads(splits_file.read_text(encoding="utf-8"))
        val = splits[fold]["val"] if fold < len(splits) else None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise NnDiffSegError(f"{splits_file} is not a valid nnU-Net split file ({type(e).__name__}: {e})") from None
    if val is None:
        raise NnDiffSegError(f"fold {fold} does not exist: {splits_file} defines fold(s) 0-{len(splits) - 1} "
                             f"(or train on 'all')")
    if not val:
        raise NnDiffSegError(f"fold {fold} of {splits_file} has no validation cases, and nnU-Net's training needs "
                             f"some: too few cases for this split (a small release?). Add cases, edit the split, "
                             f"or convert with nnU-Net's own 5 folds (nnDiffSeg_convert_stroke2021 --split nnunet)")


def _data_folder(dataset_name: str, plans_identifier: str, configuration: str) -> Optional[Path]:
    """The configuration's preprocessed data folder; None where the plans lack the configuration (build_trainer
    names the configurations there are). NnDiffSegError where there is no plans file (``load_plans``)."""
    plans = load_plans(dataset_name, plans_identifier)
    if configuration not in plans["configurations"]:
        return None
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    return Path(os.environ["nnUNet_preprocessed"]) / dataset_name / data_identifier


def check_enough_cases(dataset_name: str, plans_identifier: str, configuration: str, fold: Union[int, str]) -> None:
    """Without a splits_final.json nnU-Net's trainer makes one when a fold first trains (do_split: scikit-learn's
    KFold over the configuration's preprocessed cases), which fails for fewer than 5 cases, after the fold folder
    was made."""
    if fold == "all" or (Path(os.environ["nnUNet_preprocessed"]) / dataset_name / "splits_final.json").is_file():
        return
    data = _data_folder(dataset_name, plans_identifier, configuration)
    if data is None:
        return
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    try:
        cases = infer_dataset_class(str(data)).get_identifiers(str(data))
    except (OSError, AssertionError):  # not preprocessed (or mixed files): reported where the data is read
        return
    if len(cases) < NNUNET_FOLDS:
        raise NnDiffSegError(f"fold {fold}: nnU-Net's {NNUNET_FOLDS}-fold cross-validation needs at least "
                             f"{NNUNET_FOLDS} training cases, and {dataset_name} has {len(cases)} ({data}); train "
                             f"fold 'all' (all cases, validated on themselves), or add cases")


def check_earlier_run(fold_folder: Path, overwrite: bool) -> None:
    """A new run (no --c, no --val) must not silently replace the model or the interrupted run in its folder."""
    found = [name for name in CONTINUE_CHECKPOINTS if (fold_folder / name).is_file()]
    if not found or overwrite:
        return
    if "checkpoint_final.pth" in found:
        raise NnDiffSegError(f"{fold_folder} holds a finished training ({', '.join(found)}): --val validates it "
                             f"again, --c continues it (with a larger --num_epochs), --overwrite trains it again "
                             f"from the start, replacing it")
    raise NnDiffSegError(f"{fold_folder} holds an interrupted training ({', '.join(found)}): --c continues it, "
                         f"--overwrite trains it again from the start, replacing it")


def missing_cases(data: Path, dataset_folder: Path) -> Optional[str]:
    """None when the preprocessed data folder ``data`` holds every training case of dataset_folder/dataset.json,
    else what is wrong with it, in words to follow its name. A case counts once its .pkl, the last of its files
    nnU-Net writes, exists; the missing ones are named from dataset.json's "dataset" or from gt_segmentations/.
    A directory listing: no data is read."""
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text(encoding="utf-8"))
    expected = set(dataset_json.get("dataset", ()))
    count = len(expected) or int(dataset_json["numTraining"])
    if not data.is_dir():
        return "does not exist"
    present = {name[:-len(".pkl")] for name in os.listdir(data) if name.endswith(".pkl")}
    if len(present) >= count:
        return None
    if not expected and (dataset_folder / "gt_segmentations").is_dir():
        ending = dataset_json["file_ending"]
        expected = {name[:-len(ending)] for name in os.listdir(dataset_folder / "gt_segmentations")
                    if name.endswith(ending)}
    missing = sorted(expected - present)
    named = f" (missing: {', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''})" if missing else ""
    return f"holds {len(present)} of the {count} training cases of dataset.json{named}"


def check_preprocessed_data(dataset_name: str, plans_identifier: str, configuration: str) -> None:
    """The configuration's preprocessed data must hold every training case: a run killed while preprocessing
    (by an older nndiffseg, or nnUNetv2_preprocess) leaves a part, on which nnU-Net trains without a word (or,
    when empty, fails with "Found more than one file ending"). Plans, configuration or dataset.json that cannot
    be read are left to the trainer's own errors."""
    try:
        data = _data_folder(dataset_name, plans_identifier, configuration)
        problem = data and missing_cases(data, data.parent)
    except (NnDiffSegError, OSError, ValueError, KeyError, TypeError):
        return
    if problem:
        options = {PLANS_NAME: "", "nnUNetPlans": " -pl ExperimentPlanner"}.get(
            plans_identifier, f" -overwrite_plans_name {plans_identifier}")
        dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
        raise NnDiffSegError(f"{data} {problem} (preprocessing interrupted?); repair it with: "
                             f"nnDiffSeg_plan_and_preprocess -d {dataset_id} -c {configuration}{options}")


def _setup(plans: dict, configuration: str, dataset_json: dict) -> dict:
    """What a checkpoint option's ``setup`` may name, for one dataset, plans and configuration."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = PlansManager(plans).get_configuration(configuration)
    return {"dataset": plans["dataset_name"], "plans": f"{plans['plans_name']} {configuration}",
            "labels": dataset_json["labels"],
            "input channels": len(dataset_json.get("channel_names", dataset_json.get("modality", {}))),
            "patch size": list(config.patch_size),
            "architecture": {"network": config.network_arch_class_name, **config.network_arch_init_kwargs}}


def _differences(what: str, recorded, current) -> list[str]:
    if what == "architecture":
        return [f"{what} {k} {recorded.get(k)} recorded, {current.get(k)} here"
                for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    # the label values decide the network's channels; their names may differ between datasets
    same = list(recorded.values()) == list(current.values()) if what == "labels" else recorded == current
    return [] if same else [f"{what} {recorded} recorded, {current} here"]


def check_checkpoint_fits(flag: str, path: str, checkpoint: dict, setup: Sequence[str], dataset_name: str,
                          plans_identifier: str, configuration: str) -> None:
    """A checkpoint option's file records the dataset, plans and labels it was trained with (nnU-Net's init_args):
    refuse one whose ``setup`` (labels, input channels, patch size, architecture) differs from this run's, and
    warn (not refuse) of one from another dataset, where transfer may be meant."""
    plans = load_plans(dataset_name, plans_identifier)
    if configuration not in plans["configurations"]:
        return  # build_trainer names the configurations there are
    dataset_json = load_json(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset.json"))
    current = _setup(plans, configuration, dataset_json)
    try:
        init_args = checkpoint["init_args"]
        recorded = _setup(init_args["plans"], init_args["configuration"], init_args["dataset_json"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError):
        print(f"WARNING: --{flag} {path} records no nnU-Net dataset, plans or labels (init_args): not checked "
              f"against {dataset_name}", file=sys.stderr)
        return
    wrong = [d for what in setup for d in _differences(what, recorded[what], current[what])]
    if wrong:
        raise NnDiffSegError(f"--{flag} {path} does not fit this run: {'; '.join(wrong)} (trained on "
                             f"{recorded['dataset']}, {recorded['plans']}; this run: {dataset_name}, "
                             f"{current['plans']})")
    if recorded["dataset"] != dataset_name:
        print(f"WARNING: --{flag} {path} was trained on {recorded['dataset']}, this run trains {dataset_name} (the "
              f"same labels: fine for transfer from another dataset; otherwise give a checkpoint of "
              f"{dataset_name})", file=sys.stderr)


def check_option_values(trainer_class: type, options: dict, dataset_name: str, plans_identifier: str,
                        configuration: str) -> None:
    """The method options' values before any work (the trainer meets them after the fold folder was made): by
    the checks the trainer declares (``option_checks``: name -> check of the value; ``checkpoint_options``: name
    -> what of this run's setup that nnU-Net checkpoint must match)."""
    checks = getattr(trainer_class, "option_checks", {})
    checkpoints = getattr(trainer_class, "checkpoint_options", {})
    for name, value in options.items():
        if name in checks:
            checks[name](value)
        if name in checkpoints and value:
            checkpoint = load_checkpoint_file(value, f"--{name}")
            if "network_weights" not in checkpoint:
                raise NnDiffSegError(f"--{name} {value}: not an nnU-Net checkpoint (no network_weights)")
            check_checkpoint_fits(name, value, checkpoint, checkpoints[name], dataset_name, plans_identifier,
                                  configuration)
