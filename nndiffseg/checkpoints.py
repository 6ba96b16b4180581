"""Reading nnU-Net checkpoint files that a user points a trainer at (--prior, --mask_vae), with errors that
name the file and the flag."""
from pathlib import Path
from typing import Mapping

import torch

from nndiffseg.errors import NnDiffSegError


def read_network_weights(path: str, flag: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """(the ``network_weights`` of an nnU-Net checkpoint, the trainer name it records)."""
    if not Path(path).is_file():
        raise NnDiffSegError(f"{flag} {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise NnDiffSegError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if weights is None:
        raise NnDiffSegError(f"{flag} {path}: not an nnU-Net checkpoint (no network_weights)")
    return weights, str(checkpoint.get("trainer_name"))
