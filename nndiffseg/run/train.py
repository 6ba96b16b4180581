"""``nnDiffSeg_train``: nnU-Net training for our trainers and nnunetv2's, with run-length overrides."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.utilities.file_path_utilities import get_output_folder

from nndiffseg.checkpoints import CONTINUE_CHECKPOINTS, load_checkpoint_file
from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.files import write_atomically
from nndiffseg.planning import PLANS_NAME
from nndiffseg.run.checks import (
    check_earlier_run,
    check_enough_cases,
    check_fold,
    check_option_values,
    check_preprocessed_data,
    load_plans,
    parse_fold,
)
from nndiffseg.run.fold_lock import fold_lock
from nndiffseg.utils import check_nnunet_paths, cpu_threads, dataset_name_from_id

# nnU-Net's trainer module (and with it our trainers, diffusers and open_clip) is imported only where a trainer is
# needed: `--help` and argument errors stay quick, and the spawned workers of nnU-Net's final validation, which
# import this module again, start in seconds
if TYPE_CHECKING:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


@dataclass
class TrainingRun:
    """What one ``nnDiffSeg_train`` run trains and how: ``train``'s arguments, handed whole to each DDP rank."""
    dataset_name_or_id: Union[int, str]
    configuration: str
    fold: Union[int, str]
    trainer_name: str = "nnUNetTrainer"
    plans_identifier: str = PLANS_NAME
    device: str = "cuda"
    num_gpus: int = 1
    continue_training: bool = False
    only_run_validation: bool = False
    val_with_best: bool = False
    disable_checkpointing: bool = False
    export_validation_probabilities: bool = False
    pretrained_weights: Optional[str] = None
    num_epochs: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    val_iters_per_epoch: Optional[int] = None
    trainer_options: Optional[dict] = None  # method options (see nndiffseg.registry)
    overwrite: bool = False

    @property
    def continuing(self) -> bool:
        return self.continue_training or self.only_run_validation


def build_trainer(run: TrainingRun, device: torch.device) -> nnUNetTrainer:
    dataset_name = dataset_name_from_id(run.dataset_name_or_id)
    plans = load_plans(dataset_name, run.plans_identifier)
    if run.configuration not in plans["configurations"]:
        raise NnDiffSegError(f"configuration '{run.configuration}' not in plans {run.plans_identifier} of "
                             f"{dataset_name} (available: {', '.join(plans['configurations'])})")
    from nndiffseg.registry import find_trainer_class
    plans["continue_training"] = run.continue_training  # nnU-Net >= 2.7 reads this in the trainer's __init__
    dataset_json = load_json(join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset.json"))
    return find_trainer_class(run.trainer_name)(plans=plans, configuration=run.configuration, fold=run.fold,
                                                dataset_json=dataset_json, device=device)


def run_length_attributes(run: TrainingRun) -> dict:
    """nnDiffSeg_train's run length flags (checked by ``train``) as the trainer attributes they set (None: the
    trainer's)."""
    from nndiffseg.trainers.base import RUN_LENGTH
    return dict(zip(RUN_LENGTH, (run.num_epochs, run.iters_per_epoch, run.val_iters_per_epoch)))


def load_checkpoint_to_continue(trainer: nnUNetTrainer) -> None:
    """nnU-Net's --c (checkpoint_final, else _latest, else _best), except that an unreadable checkpoint (a
    run killed while writing it with an older nndiffseg or a stock trainer) is reported by name and the
    next one is taken."""
    existing = [os.path.join(trainer.output_folder, n) for n in CONTINUE_CHECKPOINTS
                if os.path.isfile(os.path.join(trainer.output_folder, n))]
    if not existing:
        print(f"WARNING: no checkpoint to continue from in {trainer.output_folder}; starting a new training")
        return
    unreadable = []
    for path in existing:
        try:
            load_checkpoint_file(path, "--c")  # read twice: nnU-Net's load_checkpoint takes no dict (its bug)
        except NnDiffSegError as e:
            unreadable.append(os.path.basename(path))
            print(f"WARNING: {e}", file=sys.stderr)
            continue
        if unreadable:
            print(f"WARNING: continuing from {path} instead ({', '.join(unreadable)} cannot be read)",
                  file=sys.stderr)
        trainer.load_checkpoint(path)
        return
    raise NnDiffSegError(f"--c: no readable checkpoint in {trainer.output_folder} ({', '.join(unreadable)} are "
                         f"truncated or corrupt); start a new run without --c after moving them away")


def _load_checkpoints(trainer: nnUNetTrainer, run: TrainingRun) -> None:
    """nnU-Net's maybe_load_checkpoint, with errors naming the checkpoint file."""
    if run.continue_training and run.pretrained_weights is not None:
        raise NnDiffSegError("--c and -pretrained_weights cannot be combined (pretrained weights only start a run)")
    if run.continue_training:
        load_checkpoint_to_continue(trainer)
    elif run.only_run_validation:
        final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        if not os.path.isfile(final):
            raise NnDiffSegError(f"--val: training is not finished, {final} does not exist")
        load_checkpoint_file(final, "--val")
        trainer.load_checkpoint(final)
    elif run.pretrained_weights is not None:
        load_checkpoint_file(run.pretrained_weights, "-pretrained_weights")
        if not trainer.was_initialized:
            trainer.initialize()
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
        load_pretrained_weights(trainer.network, run.pretrained_weights, verbose=True)


def _fold_folder_before(fold_folder: Path) -> Optional[dict]:
    """What a fold folder holds before a run: its file names, and its run record (rewritten before the run's last
    checks); None where there is no folder yet."""
    if not fold_folder.is_dir():
        return None
    from nndiffseg.trainers.base import RUN_RECORD
    record = fold_folder / RUN_RECORD
    return {"names": set(os.listdir(fold_folder)), "record": record.read_bytes() if record.is_file() else None}


def _remove_what_a_refused_run_wrote(fold_folder: Path, before: Optional[dict], results: Path) -> None:
    """What a run that failed its checks wrote: in an existing fold folder the files it added (its training log,
    the lock file) and its run record, else the fold folder it made (and its empty parents up to nnUNet_results)."""
    if before is not None:
        for name in set(os.listdir(fold_folder)) - before["names"]:
            if (fold_folder / name).is_file():
                (fold_folder / name).unlink()
        if before["record"] is not None:
            from nndiffseg.trainers.base import RUN_RECORD
            write_atomically(str(fold_folder / RUN_RECORD), lambda name: Path(name).write_bytes(before["record"]))
        return
    shutil.rmtree(fold_folder, ignore_errors=True)
    for parent in fold_folder.parents:
        if parent == results or results not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: other folds or trainers
            break


@contextmanager
def _undone_if_refused(fold_folder: Path, before: Optional[dict]) -> Iterator[None]:
    """A check that refuses the run inside this leaves the fold folder as the run found it (undone once, by rank 0
    under DDP)."""
    try:
        yield
    except NnDiffSegError:
        if not (dist.is_initialized() and dist.get_rank() != 0):
            _remove_what_a_refused_run_wrote(fold_folder, before, Path(os.environ["nnUNet_results"]).resolve())
        raise


def _remove_the_earlier_run(fold_folder: Path) -> None:
    """--overwrite, once the new run has passed its checks: the earlier run's checkpoints and validation go (a kill
    from here on leaves only the new run's checkpoints, for --c); its training logs stay."""
    removed = [name for name in (*CONTINUE_CHECKPOINTS, "validation") if (fold_folder / name).exists()]
    for name in CONTINUE_CHECKPOINTS:
        (fold_folder / name).unlink(missing_ok=True)
    shutil.rmtree(fold_folder / "validation", ignore_errors=True)
    if removed:
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {fold_folder}")


def _train_one_process(run: TrainingRun, fold_folder: Path, before: Optional[dict]) -> None:
    device = torch.device(run.device)
    with _undone_if_refused(fold_folder, before):
        trainer = build_trainer(run, device)
        # our trainers record their options and run length, stock ones their run length: --c and --val restore them
        if hasattr(trainer, "continuing"):
            trainer.continuing = run.continuing
            trainer.configure_run(run.trainer_options, run_length_attributes(run))
        else:
            from nndiffseg.trainers.base import configure_run
            configure_run(trainer, run.trainer_options, run_length_attributes(run), run.continuing)
        trainer.disable_checkpointing = run.disable_checkpointing
        _load_checkpoints(trainer, run)
    if run.overwrite and trainer.local_rank == 0:
        _remove_the_earlier_run(fold_folder)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not run.only_run_validation:
        trainer.run_training()
    if run.val_with_best:
        best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
        load_checkpoint_file(best, "--val_best")
        trainer.load_checkpoint(best)
    trainer.perform_actual_validation(run.export_validation_probabilities)


def _train_ddp(rank: int, world_size: int, run: TrainingRun, fold_folder: Path, before: Optional[dict]) -> None:
    """One DDP rank: nccl with one GPU per rank, or gloo on the CPU."""
    cuda = run.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    if cuda:
        torch.cuda.set_device(torch.device("cuda", rank))
    else:
        torch.set_num_threads(max(1, cpu_threads() // world_size))
    try:
        _train_one_process(run, fold_folder, before)
    finally:
        dist.destroy_process_group()


def train(dataset_name_or_id: Union[int, str], configuration: str, fold: Union[int, str], **settings) -> None:
    """Train one fold as ``nnUNetv2_train`` does, then run nnU-Net's final validation; ``settings`` are
    TrainingRun's other fields, by name. A new run in a fold folder that holds a finished or interrupted one is
    refused unless ``overwrite``; one run per fold folder at a time."""
    run = TrainingRun(dataset_name_or_id, configuration, fold, **settings)
    check_nnunet_paths("nnUNet_preprocessed", "nnUNet_results")
    run.fold = parse_fold(run.fold)
    if run.continue_training and run.only_run_validation:
        raise NnDiffSegError("--c and --val cannot be combined")
    if run.overwrite and run.continuing:
        raise NnDiffSegError(f"--overwrite starts a new training; it cannot be combined with "
                             f"{'--c' if run.continue_training else '--val'}")
    if run.val_with_best and run.disable_checkpointing:
        raise NnDiffSegError("--val_best needs checkpoints; do not combine it with --disable_checkpointing")
    if run.device not in ("cpu", "cuda", "mps"):
        raise NnDiffSegError(f"-device must be cpu, cuda or mps, got '{run.device}'")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise NnDiffSegError("-device cuda but no CUDA GPU is available; use -device cpu")
    for flag in ("num_epochs", "iters_per_epoch", "val_iters_per_epoch", "num_gpus"):
        value = getattr(run, flag)
        if value is not None and value < 1:  # before the trainers are imported: a typo is reported at once
            raise NnDiffSegError(f"-{'' if flag == 'num_gpus' else '-'}{flag} must be at least 1, got {value}")
    from nndiffseg.registry import TRAIN, check_options, find_trainer_class
    trainer_class = find_trainer_class(run.trainer_name)
    run.trainer_options = check_options(trainer_class, run.trainer_options or {}, TRAIN)  # before any work
    dataset_name = dataset_name_from_id(run.dataset_name_or_id)
    # a continued run's options must equal its record (checked when the trainer is built), which passed these checks
    if not run.continuing:
        check_option_values(trainer_class, run.trainer_options, dataset_name, run.plans_identifier,
                            run.configuration)
    check_fold(dataset_name, run.fold)
    check_preprocessed_data(dataset_name, run.plans_identifier, run.configuration)
    check_enough_cases(dataset_name, run.plans_identifier, run.configuration, run.fold)
    if run.num_gpus > 1 and run.device not in ("cuda", "cpu"):
        raise NnDiffSegError(f"-num_gpus {run.num_gpus} (DDP) needs -device cuda (one GPU per process) or cpu (gloo)")
    if run.num_gpus > 1 and run.device == "cuda" and torch.cuda.device_count() < run.num_gpus:
        raise NnDiffSegError(f"-num_gpus {run.num_gpus} but only {torch.cuda.device_count()} CUDA GPU(s) are "
                             f"visible")
    fold_folder = Path(get_output_folder(dataset_name, run.trainer_name, run.plans_identifier, run.configuration,
                                         run.fold)).resolve()
    before = _fold_folder_before(fold_folder)
    with fold_lock(fold_folder):  # held by this process alone; DDP's ranks run under it
        if not run.continuing:
            with _undone_if_refused(fold_folder, before):
                check_earlier_run(fold_folder, run.overwrite)
        _run(run, fold_folder, before)


def _run(run: TrainingRun, fold_folder: Path, before: Optional[dict]) -> None:
    if run.num_gpus > 1:
        from nnunetv2.run.run_training import find_free_network_port
        os.environ["MASTER_ADDR"] = "localhost"
        os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
        try:
            torch.multiprocessing.spawn(_train_ddp, args=(run.num_gpus, run, fold_folder, before),
                                        nprocs=run.num_gpus, join=True)
        except torch.multiprocessing.ProcessRaisedException as e:  # the rank's own traceback was printed above
            raise NnDiffSegError(f"a DDP process failed: {str(e).strip().splitlines()[-1]}") from None
        return
    if run.device == "cpu":
        torch.set_num_threads(cpu_threads())
    elif run.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    _train_one_process(run, fold_folder, before)


def train_entry() -> None:
    parser = argparse.ArgumentParser(description="Train one fold with nnU-Net's training loop. Trainers are looked "
                                                 "up in nndiffseg.trainers, then in nnunetv2 (-tr nnUNetTrainer "
                                                 "trains the plain nnU-Net baseline).")
    parser.add_argument("dataset_name_or_id", help="dataset name or ID")
    parser.add_argument("configuration", help="configuration, e.g. 2d")
    parser.add_argument("fold", help="fold of nnU-Net's 5-fold cross-validation (0-4) or 'all'")
    parser.add_argument("-tr", dest="trainer_name", metavar="TR", default="nnUNetTrainer",
                        help="trainer class (default: nnUNetTrainer)")
    parser.add_argument("-p", dest="plans_identifier", metavar="P", default=PLANS_NAME,
                        help=f"plans identifier (default: {PLANS_NAME})")
    parser.add_argument("-device", default="cuda", help="cuda (default), cpu or mps")
    parser.add_argument("-num_gpus", type=int, default=1,
                        help="DDP processes (default: 1): one per GPU with -device cuda, or N CPU processes on "
                             "gloo with -device cpu (a multi-process check without GPUs)")
    parser.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to start from")
    parser.add_argument("--c", dest="continue_training", action="store_true",
                        help="continue from the latest checkpoint")
    parser.add_argument("--val", dest="only_run_validation", action="store_true", help="only run the final validation")
    parser.add_argument("--val_best", dest="val_with_best", action="store_true", help="validate with checkpoint_best")
    parser.add_argument("--overwrite", action="store_true",
                        help="train again from the start in a fold folder that holds a finished or interrupted run "
                             "(refused without it): its checkpoints and validation are removed once the new run has "
                             "passed its checks")
    parser.add_argument("--npz", dest="export_validation_probabilities", action="store_true",
                        help="save validation probabilities (for ensembling)")
    parser.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoints")
    parser.add_argument("--num_epochs", type=int, default=None, help="epochs (default: the trainer's, 1000)")
    parser.add_argument("--iters_per_epoch", type=int, default=None,
                        help="training iterations per epoch (default: the trainer's, 250)")
    parser.add_argument("--val_iters_per_epoch", type=int, default=None,
                        help="validation iterations per epoch (default: the trainer's 50, or iters_per_epoch/5 "
                             "when --iters_per_epoch is given)")
    from nndiffseg.registry import TRAIN, add_option_groups
    names = add_option_groups(parser, TRAIN)
    args = parser.parse_args()
    options = {name: getattr(args, name) for name in names}
    settings = {f.name: getattr(args, f.name) for f in fields(TrainingRun) if hasattr(args, f.name)}
    run_cli(lambda: train(**settings, trainer_options=options))


if __name__ == "__main__":
    train_entry()
