"""``nnDiffSeg_plan_and_preprocess``: nnU-Net's fingerprint, planning and preprocessing, with nnDiffSegPlans
by default."""
import argparse
import contextlib
import os
from typing import List, Optional, Sequence, Type

import nnunetv2
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                  plan_experiment_dataset, preprocess_dataset)
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.planning import planner as nndiffseg_planners
from nndiffseg.utils import check_nnunet_paths, dataset_name_from_id

DEFAULT_NUM_PROCESSES = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}


def find_planner_class(name: str) -> Type[ExperimentPlanner]:
    """Our planners first, then nnunetv2's (ExperimentPlanner, nnUNetPlannerResEncM, ...)."""
    cls = getattr(nndiffseg_planners, name, None)
    if cls is None:
        cls = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), name,
                                          current_module="nnunetv2.experiment_planning")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ExperimentPlanner)):
        raise NnDiffSegError(f"experiment planner '{name}' not found in nndiffseg.planning or "
                             f"nnunetv2.experiment_planning (try nnDiffSegPlanner or ExperimentPlanner)")
    return cls


@contextlib.contextmanager
def _augmentation_workers_at_least_one():
    """nnU-Net's planner sizes torch's thread pool by nnUNet_n_proc_DA, which fails at 0 (a valid training
    setting: augmentation in the main process); planning sees 1 instead."""
    value = os.environ.get("nnUNet_n_proc_DA")
    if value is not None and value.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if value is not None:
            os.environ["nnUNet_n_proc_DA"] = value


def plan_and_preprocess(dataset_ids: Sequence[int], configurations: Sequence[str] = ("2d",),
                        planner_name: str = "nnDiffSegPlanner", num_processes: Optional[List[int]] = None,
                        num_processes_fingerprint: Optional[int] = None, verify_dataset_integrity: bool = False,
                        clean: bool = False, preprocess: bool = True, gpu_memory_target: Optional[float] = None,
                        overwrite_plans_name: Optional[str] = None) -> str:
    """Run fingerprint extraction, planning and preprocessing; returns the plans identifier written."""
    check_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed")
    for d in dataset_ids:
        dataset_name_from_id(d)  # clear error for an unknown ID before any work
    planner_class = find_planner_class(planner_name)
    cpus = os.cpu_count() or 1
    if num_processes is None:
        num_processes = [min(DEFAULT_NUM_PROCESSES.get(c, 4), cpus) for c in configurations]
    elif len(num_processes) == 1:
        num_processes = num_processes * len(configurations)
    elif len(num_processes) != len(configurations):
        raise NnDiffSegError(f"-np takes one number or one per configuration ({len(configurations)}), "
                             f"got {len(num_processes)}")

    plans_identifier = None
    for d in dataset_ids:
        print(f"Fingerprint extraction for dataset {d}...")
        extract_fingerprint_dataset(d, num_processes=num_processes_fingerprint or min(8, cpus),
                                    check_dataset_integrity=verify_dataset_integrity, clean=clean)
        print("Experiment planning...")
        with _augmentation_workers_at_least_one():
            _, plans_identifier = plan_experiment_dataset(d, planner_class, gpu_memory_target,
                                                          overwrite_plans_name=overwrite_plans_name)
        if preprocess:
            print("Preprocessing...")
            preprocess_dataset(d, plans_identifier, list(configurations), num_processes)
    return plans_identifier


def plan_and_preprocess_entry() -> None:
    parser = argparse.ArgumentParser(
        description="nnU-Net fingerprint extraction, experiment planning and preprocessing. The default planner "
                    "writes plans 'nnDiffSegPlans', whose 2D patch edges are multiples of 64 (8 for the KL-f8 "
                    "latent x 2^3 for the latent denoiser); '-pl ExperimentPlanner' writes plain 'nnUNetPlans'.")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset ID(s)")
    parser.add_argument("-c", nargs="+", default=["2d"],
                        help="configurations to preprocess (default: 2d; the diffusion heads are 2D). "
                             "Configurations a dataset does not have are skipped.")
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
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="check the raw dataset with nnU-Net's integrity check first (recommended once)")
    parser.add_argument("--clean", action="store_true", help="re-extract an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="fingerprint and plans only, no preprocessing")
    args = parser.parse_args()

    def main() -> None:
        plans = plan_and_preprocess(args.d, args.c, args.pl, args.np, args.npfp, args.verify_dataset_integrity,
                                    args.clean, not args.no_pp, args.gpu_memory_target, args.overwrite_plans_name)
        print(f"Done: plans '{plans}'. Train with: nnDiffSeg_train DATASET CONFIG FOLD -tr TRAINER -p {plans}")

    run_cli(main)


if __name__ == "__main__":
    plan_and_preprocess_entry()
