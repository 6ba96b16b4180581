"""The one way nndiffseg writes a file: to a hidden ``.partial_`` name in the same folder, renamed once complete,
so a reader (or a run continued after a kill) sees the old file or the whole new one, never a truncated one."""
import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

PARTIAL_PREFIX = ".partial_"  # a leftover with this prefix is a write that was killed

PathLike = Union[str, Path]


def partial_name(filename: PathLike) -> str:
    folder, name = os.path.split(str(filename))
    return os.path.join(folder, PARTIAL_PREFIX + name)


def write_atomically(filename: PathLike, write: Callable[[str], None],
                     before_rename: Optional[Callable[[], None]] = None) -> None:
    """``write(temporary name)`` in the same folder, then renamed to ``filename``. A failed write is removed;
    a ``write`` that writes nothing (nnU-Net's checkpointing on other DDP ranks) leaves ``filename`` alone."""
    partial = partial_name(filename)
    try:
        write(partial)
        if os.path.isfile(partial):
            if before_rename is not None:
                before_rename()
            os.replace(partial, str(filename))
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_text(filename: PathLike, text: str) -> None:
    write_atomically(filename, lambda name: Path(name).write_text(text))


def write_json(filename: PathLike, data, indent: int = 2) -> None:
    write_text(filename, json.dumps(data, indent=indent) + "\n")


def remove_partials(folder: PathLike, pattern: str = "*", recursive: bool = False) -> None:
    """Writes a kill interrupted in ``folder`` (their complete predecessors are untouched)."""
    folder = Path(folder)
    for leftover in (folder.rglob if recursive else folder.glob)(PARTIAL_PREFIX + pattern):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
