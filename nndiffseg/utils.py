"""Small helpers around nnU-Net's environment and dataset naming, with errors a user can act on."""
import os
from typing import Sequence

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nndiffseg.errors import NnDiffSegError


def check_nnunet_paths(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise NnDiffSegError(f"{', '.join(missing)} not set: export the nnU-Net folders first, e.g. "
                             f"export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed "
                             f"nnUNet_results=/data/nnUNet_results")
    for name in names:
        if os.path.exists(os.environ[name]) and not os.path.isdir(os.environ[name]):
            raise NnDiffSegError(f"{name}={os.environ[name]} is a file, not a folder: point {name} at a folder")


def dataset_name_from_id(dataset_name_or_id: int | str) -> str:
    """'4' / 4 / 'Dataset004_ISIC2017' -> 'Dataset004_ISIC2017', or a clear error."""
    if isinstance(dataset_name_or_id, str) and not dataset_name_or_id.startswith("Dataset"):
        try:
            dataset_name_or_id = int(dataset_name_or_id)
        except ValueError:
            raise NnDiffSegError(f"dataset must be an ID or a name like Dataset004_ISIC2017, "
                                 f"got '{dataset_name_or_id}'") from None
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise NnDiffSegError(str(e).strip()) from None


def cpu_threads() -> int:
    """Threads for torch on the CPU: OMP_NUM_THREADS when the user (or a scheduler, or parallel tests) set it,
    else every core, as nnU-Net does."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


def name_list(names: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names for a message, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
