"""One nnDiffSeg_train run per fold folder at a time: an exclusive flock on a hidden file in the folder. The
kernel releases it when the process ends, however it ends, so a killed run never blocks the next one."""
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from nndiffseg.errors import NnDiffSegError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

LOCK_FILE = ".nndiffseg_train.lock"


def _holder_pid(fd: int) -> Optional[int]:
    """The pid that holds the flock on ``fd``'s file, from Linux's /proc/locks (None elsewhere)."""
    st = os.fstat(fd)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for fields in map(str.split, lines):  # "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"
        if "FLOCK" in fields and "->" not in fields and file_id in fields:
            return int(fields[fields.index(file_id) - 1])
    return None


def _still_named(fd: int, path: Path) -> bool:
    """A refused run removes the lock file it made; a run that opened it just before must lock the new one."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def fold_lock(fold_folder: Path) -> Iterator[None]:
    """Hold the fold folder (made if needed) for this run, or refuse when another run holds it."""
    if fcntl is None:
        yield
        return
    fold_folder.mkdir(parents=True, exist_ok=True)
    path = fold_folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise NnDiffSegError(f"{fold_folder} is in use by another nnDiffSeg_train run"
                                 f"{f' (pid {pid})' if pid else ''}: one training of a fold at a time; wait for "
                                 f"it to end, or stop it and continue with --c") from None
        if _still_named(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)
