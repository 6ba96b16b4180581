"""``nnDiffSeg_ensemble``: nnU-Net's ensembling of prediction folders (the mean of their class probabilities,
``--save_probabilities`` of nnDiffSeg_predict or nnUNetv2_predict), for folders of different trainers.

The averaging is nnunetv2's ``ensemble_folders``. It averages the ``probabilities`` of each ``CASE.npz``, which
nnU-Net's export writes after its softmax: for a diffusion head that returns the log of its fused probabilities
the softmax gives those probabilities back, so every trainer enters the mean on the same scale. What this adds:
the folders are checked first (each error names the folder and case), plans.json is written beside the
ensemble too (nnU-Net's writes only dataset.json, and postprocessing needs both), and nothing is written when
a check fails. When any folder holds uncertainty maps (``nnDiffSeg_predict --save_uncertainty``), the ensemble
gets ``uncertainty/CASE.npz`` too: the members' sample spreads pooled with the spread across members
(``nndiffseg.inference.pooled_spread``; a member without maps, such as nnU-Net's, counts as one that does not
sample)."""
import argparse
import json
import os
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.inference.pooled_spread import PooledSpread
from nndiffseg.inference.prediction_folder import (
    RECORD_FILES,
    UNCERTAINTY_FOLDER,
    UNCERTAINTY_KEY,
    case_outputs,
    load_array,
    read_record,
    uncertainty_file,
    write_record,
)


def _cases_with_probabilities(folder: Path, file_ending: str) -> Dict[str, bool]:
    """Case -> whether its .npz and .pkl (nnU-Net's properties) are there, for each label map in ``folder``."""
    cases = [f.name[:-len(file_ending)] for f in folder.iterdir()
             if f.name.endswith(file_ending) and not f.name.startswith(".")]
    return {c: all((folder / f).is_file() for f in case_outputs(c, file_ending, True, False, 0)[1:]) for c in cases}


def _npz_shape(file: Path, key: str) -> tuple:
    """The shape of ``key`` in ``file``, from the array's header only: a truncated or corrupt file, or one without
    ``key``, is named."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = [n[:-len(".npy")] for n in archive.namelist()]
            if key not in names:
                raise NnDiffSegError(f"{file} holds no '{key}' array (keys: {', '.join(names)})")
            with archive.open(f"{key}.npy") as member:
                major, _ = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(member)
        return tuple(shape)
    except NnDiffSegError:
        raise
    except Exception as e:
        raise NnDiffSegError(f"could not read {file}: {type(e).__name__}: {e}") from None


def check_prediction_folders(folders: Sequence[Path]) -> tuple:
    """(dataset.json, plans.json) of the first folder once every folder holds the same cases with readable
    probabilities and the same labels and shapes, and every uncertainty/ folder a map of that shape for each case."""
    if len(folders) < 2:
        raise NnDiffSegError(f"-i needs at least two prediction folders to ensemble, got {len(folders)}")
    resolved = [f.resolve() for f in folders]
    twice = [f for f, r in zip(folders, resolved) if resolved.count(r) > 1]
    if twice:
        raise NnDiffSegError(f"-i names the prediction folder {twice[0]} more than once ({', '.join(map(str, twice))}):"
                             f" it would weigh double in the mean")
    metadata = []
    for folder in folders:
        if not folder.is_dir():
            raise NnDiffSegError(f"prediction folder {folder} does not exist")
        files = [folder / name for name in RECORD_FILES[:2]]  # dataset.json, plans.json
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise NnDiffSegError(f"{folder} has no {' and no '.join(missing)}: predict it again with "
                                 f"nnDiffSeg_predict or nnUNetv2_predict (both write them beside the predictions)")
        metadata.append([json.loads(f.read_text()) for f in files])
    dataset_json, plans = metadata[0]
    ending = dataset_json["file_ending"]
    first_shapes = None  # of the first folder's cases
    for folder, (other_json, _) in zip(folders, metadata):
        if other_json.get("labels") != dataset_json.get("labels"):
            raise NnDiffSegError(f"{folder} predicts the labels {other_json.get('labels')}, {folders[0]} "
                                 f"{dataset_json.get('labels')}: only predictions of one dataset can be ensembled")
        cases = _cases_with_probabilities(folder, ending)
        if not cases:
            raise NnDiffSegError(f"no predictions ({ending}) in {folder}")
        without = sorted(c for c, ok in cases.items() if not ok)
        if without:
            raise NnDiffSegError(f"{folder} has no probabilities for case(s) {', '.join(without[:5])}: predict "
                                 f"with --save_probabilities (they are what is averaged)")
        if first_shapes is not None and set(cases) != set(first_shapes):
            differ = sorted(set(cases) ^ set(first_shapes))
            raise NnDiffSegError(f"{folder} and {folders[0]} hold different cases (e.g. {', '.join(differ[:5])})")
        shapes = {case: _npz_shape(folder / f"{case}.npz", "probabilities") for case in sorted(cases)}
        first_shapes = first_shapes or shapes
        for case, shape in shapes.items():
            if shape != first_shapes[case]:
                raise NnDiffSegError(f"{folder / f'{case}.npz'} holds probabilities of shape {shape}, "
                                     f"{folders[0] / f'{case}.npz'} of shape {first_shapes[case]}")
        if (folder / UNCERTAINTY_FOLDER).is_dir():
            without = sorted(c for c in cases if not uncertainty_file(folder, c).is_file())
            if without:
                raise NnDiffSegError(f"{folder / UNCERTAINTY_FOLDER} has no uncertainty map for case(s) "
                                     f"{', '.join(without[:5])}: predict them again with --save_uncertainty, or "
                                     f"remove the folder")
            for case, shape in shapes.items():
                spread = _npz_shape(file := uncertainty_file(folder, case), UNCERTAINTY_KEY)
                if int(np.prod(spread)) != int(np.prod(shape[1:])):
                    raise NnDiffSegError(f"{file} has shape {spread}, its probabilities {shape[1:]}")
    return dataset_json, plans


def _image_file(folder: Path, case: str) -> str | None:
    """The case's first image, where nnDiffSeg_predict's record names its input folder (for the picture)."""
    input_folder = (read_record(folder) or {}).get("input_folder")
    return str(Path(input_folder) / f"{case}_0000.png") if input_folder else None


def write_pooled_uncertainty(folders: Sequence[Path], out: Path, file_ending: str) -> List[str]:
    """``out/uncertainty/CASE.npz`` (and a picture for 2D PNG images) for every case of the ensemble."""
    from nndiffseg.inference.uncertainty import save_uncertainty_map
    with_maps = [f for f in folders if (f / UNCERTAINTY_FOLDER).is_dir()]
    cases = sorted(_cases_with_probabilities(folders[0], file_ending))
    for case in tqdm(cases, desc="Pooling uncertainty", unit="case"):
        pooled = PooledSpread()
        for folder in folders:
            probabilities = torch.from_numpy(load_array(folder / f"{case}.npz", "probabilities"))
            spread = torch.from_numpy(load_array(uncertainty_file(folder, case), UNCERTAINTY_KEY)) \
                if folder in with_maps else None
            pooled.add(probabilities, spread)  # shapes checked by check_prediction_folders
        image = next(filter(None, (_image_file(f, case) for f in folders)), None)
        save_uncertainty_map(pooled.spread().numpy(), out, case, image, out / f"{case}{file_ending}", f"ensemble of "
                             f"{len(folders)} prediction folders and its uncertainty (pooled spread; 0: all agree)")
    return cases


def ensemble(input_folders: Sequence[str], output_folder: str, save_probabilities: bool = False,
             num_processes: int = 2) -> None:
    folders = [Path(f) for f in input_folders]
    out = Path(output_folder)
    if num_processes < 1:
        raise NnDiffSegError(f"-np must be at least 1, got {num_processes}")
    if out.exists() and not out.is_dir():
        raise NnDiffSegError(f"-o {out} is a file, not a folder")
    if any(out.resolve() == f.resolve() for f in folders if f.exists()):
        raise NnDiffSegError("the output folder must differ from the input folders")
    dataset_json, plans = check_prediction_folders(folders)
    from nnunetv2.ensembling.ensemble import ensemble_folders
    print(f"Ensembling {len(folders)} folders ({', '.join(map(str, folders))}) into {out}")
    ensemble_folders([str(f) for f in folders], str(out), save_probabilities, num_processes, dataset_json, plans)
    if any((f / UNCERTAINTY_FOLDER).is_dir() for f in folders):
        write_pooled_uncertainty(folders, out, dataset_json["file_ending"])
    write_record(out, dataset_json, plans, {"ensemble_of": [str(f.resolve()) for f in folders],
                                            "save_probabilities": save_probabilities})
    print(f"Ensemble written to {out}")


def ensemble_entry() -> None:
    parser = argparse.ArgumentParser(description="Ensemble prediction folders (of any trainers of one dataset) by "
                                                 "averaging their class probabilities, as nnUNetv2_ensemble does")
    parser.add_argument("-i", nargs="+", required=True, help="prediction folders written with --save_probabilities")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-np", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    parser.add_argument("--save_npz", action="store_true", help="also write the averaged probabilities")
    args = parser.parse_args()
    run_cli(lambda: ensemble(args.i, args.o, args.save_npz, args.np))


if __name__ == "__main__":
    ensemble_entry()
