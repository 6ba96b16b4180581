"""Reading and writing nnU-Net checkpoint files, with errors that name the file and the flag: a checkpoint a
user points a trainer at (--prior, --mask_vae, -pretrained_weights) and the one --c continues from."""
from pathlib import Path
from typing import Mapping

import torch

from nndiffseg.errors import NnDiffSegError
from nndiffseg.files import remove_partials

# a run's checkpoints in its fold folder; --c takes the first of these that exists, as nnU-Net does (an
# unreadable one falls back to the next)
CONTINUE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def load_checkpoint_file(path: str, flag: str) -> dict:
    """The checkpoint dict in ``path`` (on the CPU), or an error naming the file when it is missing, truncated,
    corrupt or no torch file at all."""
    if not Path(path).is_file():
        raise NnDiffSegError(f"{flag} {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # EOFError for a truncated file, UnpicklingError/RuntimeError for a corrupt one, ...
        raise NnDiffSegError(f"{flag} {path}: not a readable checkpoint, truncated or corrupt "
                             f"({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict):
        raise NnDiffSegError(f"{flag} {path}: not an nnU-Net checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def read_network_weights(path: str, flag: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """(the ``network_weights`` of an nnU-Net checkpoint, the trainer name it records)."""
    checkpoint = load_checkpoint_file(path, flag)
    weights = checkpoint.get("network_weights")
    if weights is None:
        raise NnDiffSegError(f"{flag} {path}: not an nnU-Net checkpoint (no network_weights)")
    return weights, str(checkpoint.get("trainer_name"))


def remove_stale_partials(folder: str) -> None:
    """Checkpoint writes a kill interrupted (their complete predecessors are untouched)."""
    remove_partials(folder, "checkpoint_*.pth")
