"""``nnDiffSeg_plan_and_preprocess``: nnU-Net's fingerprint, planning and preprocessing, with nnDiffSegPlans
by default."""
import argparse
import contextlib
import copy
import itertools
import json
import os
import shutil
import types
from pathlib import Path
from typing import List, Optional, Sequence, Type
from unittest import mock

import nnunetv2
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2 import paths as nnunet_paths
from nnunetv2.experiment_planning import verify_dataset_integrity as nnunet_verify_module
from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as nnunet_fingerprint_module
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprint_dataset,
    plan_experiment_dataset,
    preprocess_dataset,
)
from nnunetv2.experiment_planning.verify_dataset_integrity import (
    verify_dataset_integrity as nnunet_verify_dataset_integrity,
)
from nnunetv2.preprocessing.preprocessors import default_preprocessor as nnunet_preprocessor_module
from nnunetv2.utilities import utils as nnunet_utils_module
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.files import write_json
from nndiffseg.planning import planner as nndiffseg_planners
from nndiffseg.planning.raters import num_raters, preprocess_raters
from nndiffseg.pools import quiet_pool
from nndiffseg.run.checks import missing_cases
from nndiffseg.utils import check_nnunet_paths, dataset_name_from_id

DEFAULT_NUM_PROCESSES = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
# beside a configuration's data folder X: .X.staging (the new data while it is written, and .X.staging.json its
# plans), .X.replaced (the earlier data during the swap), .X.previous (where earlier nndiffseg versions kept the
# earlier data while nnU-Net preprocessed in place)
STAGING, REPLACED, PREVIOUS = ".staging", ".replaced", ".previous"


def find_planner_class(name: str) -> Type[ExperimentPlanner]:
    """Our planners first, then nnunetv2's (ExperimentPlanner, nnUNetPlannerResEncM, ...)."""
    cls = getattr(nndiffseg_planners, name, None) or recursive_find_python_class(
        join(nnunetv2.__path__[0], "experiment_planning"), name, current_module="nnunetv2.experiment_planning")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ExperimentPlanner)):
        raise NnDiffSegError(f"experiment planner '{name}' not found in nndiffseg.planning or "
                             f"nnunetv2.experiment_planning (try nnDiffSegPlanner or ExperimentPlanner)")
    return cls


def _augmentation_workers_at_least_one():
    """nnU-Net's planner sizes torch's thread pool by nnUNet_n_proc_DA, which fails at 0 (a valid training
    setting: augmentation in the main process); planning sees 1 instead."""
    zero = os.environ.get("nnUNet_n_proc_DA", "").strip() == "0"
    return mock.patch.dict(os.environ, {"nnUNet_n_proc_DA": "1"}) if zero else contextlib.nullcontext()


def plan_and_preprocess(dataset_ids: Sequence[int], configurations: Sequence[str] = ("2d",),
                        planner_name: str = "nnDiffSegPlanner", num_processes: Optional[List[int]] = None,
                        num_processes_fingerprint: Optional[int] = None, verify_dataset_integrity: bool = True,
                        clean: bool = False, preprocess: bool = True, gpu_memory_target: Optional[float] = None,
                        overwrite_plans_name: Optional[str] = None) -> str:
    """Check the raw datasets (nnU-Net's integrity check unless ``verify_dataset_integrity`` is False), then run
    fingerprint extraction, planning and preprocessing; returns the plans identifier written. Every argument is
    checked before anything is written, and a configuration's earlier preprocessed data stays in place until
    the new data is complete (also when the run is killed)."""
    check_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed")
    names = [dataset_name_from_id(d) for d in dataset_ids]  # clear error for an unknown ID before any work
    planner_class = find_planner_class(planner_name)
    num_processes = _check_process_counts(configurations, num_processes, num_processes_fingerprint)
    num_processes_fingerprint = num_processes_fingerprint or min(8, os.cpu_count() or 1)
    for name in names:
        check_raw_dataset(name)
        check_configuration_names(configurations, name)

    plans_identifier = None
    for d, name in zip(dataset_ids, names):
        with _removed_if_new(Path(nnunet_paths.nnUNet_preprocessed) / name), _planning_pools():
            if verify_dataset_integrity:
                print(f"Checking dataset {d} with nnU-Net's verify_dataset_integrity (skip it with --no_verify)...")
                verify_dataset_integrity_with(join(nnunet_paths.nnUNet_raw, name), num_processes_fingerprint)
            print(f"Fingerprint extraction for dataset {d}...")
            extract_fingerprint_dataset(d, num_processes=num_processes_fingerprint, check_dataset_integrity=False,
                                        clean=clean)
            print("Experiment planning...")
            with _augmentation_workers_at_least_one():
                plans, plans_identifier = plan_experiment_dataset(d, planner_class, gpu_memory_target,
                                                                  overwrite_plans_name=overwrite_plans_name)
            if preprocess:
                print("Preprocessing...")
                _preprocess(d, name, plans, plans_identifier, configurations, num_processes)
    return plans_identifier


def _preprocess(dataset_id: int, dataset_name: str, plans: dict, plans_identifier: str,
                configurations: Sequence[str], num_processes: Sequence[int]) -> None:
    plans_manager = PlansManager(plans)
    dataset_folder = Path(nnunet_paths.nnUNet_preprocessed) / dataset_name
    for configuration, n in zip(configurations, num_processes):
        if configuration not in plans_manager.available_configurations:
            print(f"Configuration {configuration}: not planned for {dataset_name} (plans {plans_identifier} has "
                  f"{', '.join(plans_manager.available_configurations)}), skipped")
            continue
        folder = dataset_folder / plans_manager.get_configuration(configuration).data_identifier
        _clear_killed_run(folder)
        staging = _beside(folder, STAGING)
        try:
            _preprocess_into(staging, dataset_id, plans, configuration, n)
            dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
            if num_raters(dataset_json):
                raw = Path(nnunet_paths.nnUNet_raw) / dataset_name
                preprocess_raters(raw, staging, plans, configuration, dataset_json)
            problem = missing_cases(staging, dataset_folder)
            if problem:  # e.g. numTraining wrong and --no_verify
                raise NnDiffSegError(f"preprocessing {configuration}: the new data {problem}; "
                                     f"the earlier data stays in {folder}")
            _swap_in(staging, folder)
        finally:  # after a failure or interruption; renamed away after a swap
            shutil.rmtree(staging, ignore_errors=True)
            _plans_file(staging).unlink(missing_ok=True)


def _beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(f".{folder.name}{suffix}")


def _plans_file(staging: Path) -> Path:
    return staging.with_name(staging.name + ".json")


def _preprocess_into(staging: Path, dataset_id: int, plans: dict, configuration: str, num_processes: int) -> None:
    """nnU-Net's preprocessing of one configuration, into ``staging``: it writes where the plans' data_identifier
    says, so it gets plans (the same but for that, under the staging folder's name) that say ``staging``."""
    staging_plans = copy.deepcopy(plans)
    staging_plans["configurations"][configuration]["data_identifier"] = staging.name
    write_json(_plans_file(staging), staging_plans)
    preprocess_dataset(dataset_id, staging.name, [configuration], [num_processes])


def _swap_in(staging: Path, folder: Path) -> None:
    """The complete new data replaces ``folder`` by two renames; a kill between them leaves the earlier data as
    .replaced, which the next run puts back (training refuses the missing folder meanwhile)."""
    replaced = _beside(folder, REPLACED)
    if folder.exists():
        os.replace(folder, replaced)
    os.replace(staging, folder)
    shutil.rmtree(replaced, ignore_errors=True)


def _clear_killed_run(folder: Path) -> None:
    """What a killed run left beside a configuration's data ``folder``: its staging data and plans go, and
    complete data it had moved aside comes back (.replaced where ``folder`` is missing; .previous, of an older
    nndiffseg, in place of the half-written ``folder``)."""
    staging = _beside(folder, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    _plans_file(staging).unlink(missing_ok=True)
    previous, replaced = _beside(folder, PREVIOUS), _beside(folder, REPLACED)
    if previous.exists():
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(previous, folder)
    if replaced.exists():
        if folder.exists():  # killed after the swap, before the earlier data was removed
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(replaced, folder)


def _check_process_counts(configurations: Sequence[str], num_processes: Optional[List[int]],
                          num_processes_fingerprint: Optional[int]) -> List[int]:
    if num_processes_fingerprint is not None and num_processes_fingerprint < 1:
        raise NnDiffSegError(f"-npfp must be at least 1, got {num_processes_fingerprint}")
    if num_processes is None:
        cpus = os.cpu_count() or 1
        return [min(DEFAULT_NUM_PROCESSES.get(c, 4), cpus) for c in configurations]
    if any(n < 1 for n in num_processes):
        raise NnDiffSegError(f"-np must be at least 1, got {' '.join(map(str, num_processes))}")
    if len(num_processes) == 1:
        return list(num_processes) * len(configurations)
    if len(num_processes) != len(configurations):
        raise NnDiffSegError(f"-np takes one number or one per configuration ({len(configurations)}), "
                             f"got {len(num_processes)}")
    return list(num_processes)


def check_configuration_names(configurations: Sequence[str], dataset_name: str) -> None:
    """nnU-Net's configuration names, or those of plans already written for the dataset; any other name (a typo
    such as 2D) would preprocess nothing."""
    known = set(NNUNET_CONFIGURATIONS)
    folder = Path(nnunet_paths.nnUNet_preprocessed) / dataset_name
    for plans_file in folder.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, AttributeError, TypeError):
            known |= set(json.loads(plans_file.read_text()).get("configurations", {}))
    unknown = [c for c in configurations if c not in known]
    if unknown:
        raise NnDiffSegError(f"-c {' '.join(unknown)}: unknown configuration (nnU-Net's are "
                             f"{', '.join(NNUNET_CONFIGURATIONS)}; names are case-sensitive)")


def check_raw_dataset(dataset_name: str) -> None:
    """What nnU-Net's own checks would miss or report with a traceback: dataset.json missing or not JSON, and
    label files whose image is missing (nnU-Net lists the cases from imagesTr and drops those labels silently)."""
    folder = Path(nnunet_paths.nnUNet_raw) / dataset_name
    dataset_json = folder / "dataset.json"
    if not dataset_json.is_file():
        raise NnDiffSegError(f"{dataset_json} not found: every nnU-Net raw dataset needs a dataset.json")
    try:
        content = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise NnDiffSegError(f"{dataset_json} is not valid JSON: {e}") from None
    missing = [k for k in ("labels", "channel_names", "numTraining", "file_ending") if k not in content] \
        if isinstance(content, dict) else ["(not a JSON object)"]
    if missing:
        raise NnDiffSegError(f"{dataset_json} lacks {', '.join(missing)} (nnU-Net needs labels, channel_names, "
                             f"numTraining and file_ending)")
    if "dataset" in content or not (folder / "labelsTr").is_dir() or not (folder / "imagesTr").is_dir():
        return
    ending = content["file_ending"]
    images = {f.name[:-len(ending) - 5] for f in (folder / "imagesTr").iterdir() if f.name.endswith(ending)}
    orphans = sorted(f.name for f in (folder / "labelsTr").iterdir()
                     if f.name.endswith(ending) and not f.name.startswith(".") and f.name[:-len(ending)] not in images)
    if orphans:
        raise NnDiffSegError(f"{len(orphans)} label file(s) in {folder / 'labelsTr'} have no image in imagesTr "
                             f"(expected CASE_0000{ending}): {', '.join(orphans[:10])}")


def _in_process_pool(*args, **kwargs):
    """What nnU-Net asks of a Pool (``with Pool(n) as p: p.starmap(...)``) to list files or check a small dataset,
    run in this process."""
    return contextlib.nullcontext(types.SimpleNamespace(starmap=lambda f, a: list(itertools.starmap(f, a))))


def _pools_in(module, make_pool):
    """nnU-Net's pools of ``module`` made with make_pool(n), while the returned context is entered: nnunetv2 2.8
    takes no pool as an argument, its planning modules make theirs by module-level name
    (``multiprocessing.get_context("spawn").Pool(n)``, ``Pool``)."""
    spawn = types.SimpleNamespace(Pool=make_pool)
    return mock.patch.object(module, "multiprocessing", types.SimpleNamespace(get_context=lambda _: spawn))


@contextlib.contextmanager
def _planning_pools():
    """nnU-Net's pools in fingerprint extraction, integrity check and preprocessing as pools that one Ctrl-C or
    SIGTERM stops within seconds (nndiffseg.pools.quiet_pool); the fork pool of 12 processes with which it lists
    a dataset's files, whose workers Ctrl-C stops mid-result just as well, runs in this process instead."""
    with contextlib.ExitStack() as stack:
        for module in (nnunet_fingerprint_module, nnunet_verify_module, nnunet_preprocessor_module):
            stack.enter_context(_pools_in(module, quiet_pool))
        stack.enter_context(mock.patch.object(nnunet_utils_module, "Pool", _in_process_pool))
        yield


def verify_dataset_integrity_with(folder: str, num_processes: int) -> None:
    """nnU-Net's verify_dataset_integrity; with one process it runs here, not in a spawned worker whose
    start-up (importing torch and nnU-Net) would take longer than checking a small dataset."""
    if num_processes > 1:
        nnunet_verify_dataset_integrity(folder, num_processes)
        return
    with _pools_in(nnunet_verify_module, _in_process_pool):
        nnunet_verify_dataset_integrity(folder, 1)


@contextlib.contextmanager
def _removed_if_new(folder: Path):
    """A dataset's preprocessed folder that this run creates is removed again if the run fails."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def plan_and_preprocess_entry() -> None:
    parser = argparse.ArgumentParser(
        description="nnU-Net fingerprint extraction, experiment planning and preprocessing. The default planner "
                    "writes plans 'nnDiffSegPlans', whose 2D patch edges are multiples of 64 (8 for the KL-f8 "
                    "latent x 2^3 for the latent denoiser); '-pl ExperimentPlanner' writes plain 'nnUNetPlans'.")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset ID(s)")
    parser.add_argument("-c", nargs="+", default=["2d"],
                        help="configurations to preprocess (default: 2d; the diffusion heads are 2D). "
                             "nnU-Net's configurations the planner did not make for a dataset are skipped.")
    parser.add_argument("-np", nargs="+", type=int, default=None,
                        help="processes for preprocessing: one number, or one per configuration "
                             "(default: nnU-Net's 8/4/8, at most the number of CPUs)")
    parser.add_argument("-npfp", type=int, default=None,
                        help="processes for fingerprint extraction (default: at most 8, at most the number of CPUs)")
    parser.add_argument("-pl", default="nnDiffSegPlanner",
                        help="experiment planner class: nnDiffSegPlanner (default, plans 'nnDiffSegPlans') or any "
                             "nnunetv2 planner, e.g. ExperimentPlanner (plans 'nnUNetPlans')")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="GPU memory target in GB for the planner (nnU-Net's default: 8)")
    parser.add_argument("-overwrite_plans_name", default=None, help="write the plans under this name instead")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip nnU-Net's dataset integrity check (labels consecutive and as declared, images and "
                             "labels paired and aligned), which runs first by default")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="accepted for nnU-Net's habit; the check runs by default")
    parser.add_argument("--clean", action="store_true", help="re-extract an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="fingerprint and plans only, no preprocessing")
    args = parser.parse_args()

    def main() -> None:
        plans = plan_and_preprocess(args.d, args.c, args.pl, args.np, args.npfp, not args.no_verify,
                                    args.clean, not args.no_pp, args.gpu_memory_target, args.overwrite_plans_name)
        print(f"Done: plans '{plans}'. Train with: nnDiffSeg_train DATASET CONFIG FOLD -tr TRAINER -p {plans}")

    run_cli(main)


if __name__ == "__main__":
    plan_and_preprocess_entry()
