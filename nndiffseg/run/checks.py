"""nnDiffSeg_train's checks that need the file system: the fold against the dataset's splits, the preprocessed
data against dataset.json, and the method options' files and names, all before a trainer (and its fold folder)
exists."""
import json
import os
from pathlib import Path
from typing import Optional, Union

from nndiffseg.checkpoints import load_checkpoint_file
from nndiffseg.errors import NnDiffSegError
from nndiffseg.planning import PLANS_NAME

NNUNET_FOLDS = 5


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
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    try:
        plans = PlansManager(json.loads((folder / f"{plans_identifier}.json").read_text(encoding="utf-8")))
        data = folder / plans.get_configuration(configuration).data_identifier
        problem = missing_cases(data, folder)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # RuntimeError: no such configuration
        return
    if problem:
        options = {PLANS_NAME: "", "nnUNetPlans": " -pl ExperimentPlanner"}.get(
            plans_identifier, f" -overwrite_plans_name {plans_identifier}")
        dataset_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
        raise NnDiffSegError(f"{data} {problem} (preprocessing interrupted?); repair it with: "
                             f"nnDiffSeg_plan_and_preprocess -d {dataset_id} -c {configuration}{options}")


def _looks_like_a_path(value: str) -> bool:
    """A diffusers repo id is NAME or ORG/NAME; anything else given to --sd_weights is meant as a folder."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def check_option_values(options: dict) -> None:
    """The method options' files, folders and names, checked before any work (the trainers would otherwise
    meet them only at the start of training, after the fold folder was made)."""
    if options.get("clip_model") is not None:
        from nndiffseg.guided.text_prior import check_clip_model
        check_clip_model(options["clip_model"])
    if options.get("prompts"):
        from nndiffseg.guided.text_prior import load_prompts_file
        load_prompts_file(options["prompts"])
    weights = options.get("sd_weights")
    if weights not in (None, "random"):
        path = Path(weights).expanduser()
        if path.exists() and not path.is_dir():
            raise NnDiffSegError(f"--sd_weights {weights} is a file: give a diffusers folder (with vae/) or repo id")
        if not path.exists() and _looks_like_a_path(weights):
            raise NnDiffSegError(f"cannot load Stable Diffusion's autoencoder from --sd_weights {weights}: no such "
                                 f"local folder (a hub repo id looks like ORG/NAME, e.g. stable-diffusion-v1-5/"
                                 f"stable-diffusion-v1-5); pass an existing folder, a repo id, or --sd_weights random "
                                 f"to start from random weights")
    for flag in ("prior", "mask_vae"):
        if options.get(flag):
            checkpoint = load_checkpoint_file(options[flag], f"--{flag}")
            if "network_weights" not in checkpoint:
                raise NnDiffSegError(f"--{flag} {options[flag]}: not an nnU-Net checkpoint (no network_weights)")
