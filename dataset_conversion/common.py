"""What every converter shares: its command line, the target folder naming, staging, and refusal to clobber."""
import argparse
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from nndiffseg.errors import NnDiffSegError, run_cli

DEFAULT_NUM_PROCESSES = min(4, os.cpu_count() or 1)


class DatasetConversionError(NnDiffSegError):
    """The source data is not what the converter expects; the message names the file and the problem."""


def converter_parser(prog: str, description: str, source_help: str) -> argparse.ArgumentParser:
    """A converter's command line: -i SOURCE and -d ID, then the converter's own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-i", dest="source", required=True, type=Path, help=source_help)
    parser.add_argument("-d", dest="dataset_id", required=True, type=int, help="nnU-Net dataset ID (1-999)")
    return parser


def run_converter(parser: argparse.ArgumentParser, convert: Callable[..., Path]) -> NoReturn:
    """--overwrite and -np after the converter's own options, then ``convert(**arguments)`` as a CLI
    (nndiffseg.errors.run_cli): one ERROR: line and exit status 1 for bad input."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID and name")
    parser.add_argument("-np", dest="num_processes", type=int, default=DEFAULT_NUM_PROCESSES,
                        help=f"worker processes (default: min(4, CPU count) = {DEFAULT_NUM_PROCESSES})")
    args = parser.parse_args()
    run_cli(lambda: convert(**vars(args)) and None)  # status 0, not the folder written


def check_num_processes(num_processes: int) -> None:
    if num_processes < 1:
        raise DatasetConversionError(f"-np must be at least 1, got {num_processes}")


def run_jobs(convert: Callable[[Any], Any], jobs: Sequence, num_processes: int, description: str, unit: str,
             chunksize: int = 2) -> list:
    """``convert(job)`` for every job, in ``num_processes`` processes, in order, with a progress bar. A worker's
    DatasetConversionError comes back as is (it pickles as its message); imap keeps the order, so of several
    bad files the first is reported."""
    if num_processes == 1 or len(jobs) < 2:
        return list(tqdm(map(convert, jobs), total=len(jobs), desc=description, unit=unit))
    with Pool(min(num_processes, len(jobs))) as pool:  # forks before tqdm starts its monitor thread
        return list(tqdm(pool.imap(convert, jobs, chunksize=chunksize), total=len(jobs), desc=description,
                         unit=unit))


def save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    """A PNG that depends on the pixels alone (no ICC profile or text chunks from the source), at compression
    level 1: 3x faster than the default 6 for ~15% larger files."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.info = {}
    image.save(path, format="PNG", compress_level=1)


def check_same_size(what: str, path: Path, size: tuple[int, int], other_what: str, other: Path,
                    other_size: tuple[int, int]) -> None:
    """Refuse an ``other`` file (mask, overlay, ...) whose (width, height) differs from its image's."""
    if size != tuple(other_size):
        raise DatasetConversionError(
            f"size mismatch: {what} {path} is {size[0]}x{size[1]} px but {other_what} {other} is "
            f"{other_size[0]}x{other_size[1]} px")


def source_folder(source: str | Path) -> Path:
    """The release folder given with -i, which must exist."""
    source = Path(source)
    if not source.exists():
        raise DatasetConversionError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise DatasetConversionError(f"source {source} is not a folder")
    return source


def nnunet_raw_folder() -> Path:
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise DatasetConversionError(
            "nnUNet_raw is not set. Export it (as for nnU-Net) to the folder where raw datasets are written, "
            "e.g. export nnUNet_raw=/data/nnUNet_raw")
    if os.path.exists(raw) and not os.path.isdir(raw):
        raise DatasetConversionError(f"nnUNet_raw={raw} is a file, not a folder: point nnUNet_raw at a folder")
    return Path(raw)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise DatasetConversionError(f"dataset ID must be between 1 and 999 (nnU-Net uses three digits), "
                                     f"got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def check_target_free(raw: Path, dataset_id: int, folder_name: str, overwrite: bool) -> Path:
    """Refuse an existing dataset with this ID (another name is refused even with overwrite: nnU-Net
    could no longer tell the two apart)."""
    target = raw / folder_name
    if raw.is_dir():
        for other in sorted(raw.iterdir()):
            if re.fullmatch(rf"Dataset{dataset_id:03d}_.+", other.name) and other.name != folder_name:
                raise DatasetConversionError(
                    f"dataset ID {dataset_id} is already used by {other}; choose another -d ID")
    if target.exists() and not overwrite:
        raise DatasetConversionError(f"target dataset {target} already exists; pass --overwrite to replace it")
    return target


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_stages(target: Path) -> None:
    """Staging folders of conversions that were killed (their process is gone): nothing else removes them."""
    for stage in target.parent.glob(f".{target.name}.partial-*"):
        match = re.fullmatch(rf"\.{re.escape(target.name)}\.partial-(\d+)-.*", stage.name)
        if stage.is_dir() and (match is None or not _process_alive(int(match.group(1)))):
            shutil.rmtree(stage, ignore_errors=True)


def _user_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` (named with this process's ID, so the next run can tell a
    killed run's leftover); on success it replaces ``target``, on any error it is removed, so a failed
    conversion leaves nothing behind. The dataset gets the user's umask, as nnU-Net's folders do."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(target)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    os.chmod(stage, _user_mode())  # mkdtemp makes it 0700
    try:
        yield stage
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def refuse_non_finite(values: np.ndarray, what: str, detail: str = "") -> None:
    """Refuse ``values`` of ``what`` (e.g. 'image /x.png') holding NaN or Inf, which would pass on silently."""
    if np.issubdtype(values.dtype, np.integer):
        return
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise DatasetConversionError(
            f"{what} has non-finite values (NaN or Inf) in {bad} of {values.size} pixels{detail}")


def load_image(path: Path, what: str) -> Image.Image:
    """Open and decode an image now, so a truncated or corrupt file fails here with its name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetConversionError(f"cannot read {what} {path}: {e} (corrupt or truncated file?)") from None
