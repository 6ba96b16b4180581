"""The layout of a prediction folder, which nnDiffSeg_predict, _ensemble and _apply_postprocessing write and
every tool reads: the label maps CASE<ending> (nnU-Net's export), with --save_probabilities CASE.npz and CASE.pkl,
uncertainty/CASE.npz (and a picture), samples/sample_K/ (each a prediction folder of its own), and the record
beside them. Every file is written under a ``.partial_`` name and renamed (``nndiffseg.files``); the label map
last, as its presence marks the case done."""
import json
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from nndiffseg.errors import NnDiffSegError
from nndiffseg.files import partial_name, write_atomically, write_text

UNCERTAINTY_FOLDER = "uncertainty"
UNCERTAINTY_KEY = "uncertainty"  # the array in uncertainty/CASE.npz
SAMPLES_FOLDER = "samples"
PREDICT_ARGS_FILE = "nndiffseg_predict_args.json"
RECORD_FILES = ("dataset.json", "plans.json", PREDICT_ARGS_FILE)  # written beside the predictions


def uncertainty_file(folder: Path, case: str) -> Path:
    return Path(folder) / UNCERTAINTY_FOLDER / f"{case}.npz"


def case_outputs(case: str, file_ending: str, save_probabilities: bool, save_uncertainty: bool,
                 num_sample_maps: int) -> List[str]:
    """The files a predicted case leaves in the output folder (relative paths), its label map first."""
    files = [case + file_ending] + ([f"{case}.npz", f"{case}.pkl"] if save_probabilities else [])
    if save_uncertainty:
        files.append(f"{UNCERTAINTY_FOLDER}/{case}.npz")
    return files + [f"{SAMPLES_FOLDER}/sample_{k}/{case}{file_ending}" for k in range(num_sample_maps)]


def is_predicted(output_path: Path, files: List[str], reader) -> bool:
    """Whether every file is there and not empty, and the first (the label map) can be read by ``reader``."""
    if not all((output_path / f).is_file() and (output_path / f).stat().st_size > 0 for f in files):
        return False
    try:
        reader.read_seg(str(output_path / files[0]))
    except Exception:  # any reader failure: a file cut short by a kill or a full disk
        return False
    return True


def write_record(folder: Path, dataset_json: dict, plans: dict, arguments: dict) -> None:
    """What nnU-Net's predictor writes beside its predictions: dataset.json and plans.json (nnUNetv2_ensemble,
    nnUNetv2_apply_postprocessing and nnUNetv2_evaluate_folder read them), and the arguments of the run."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in zip(RECORD_FILES, (dataset_json, plans, arguments)):
        write_text(folder / name, json.dumps(content, indent=4, default=str))


def read_record(folder: Path) -> Optional[dict]:
    """The run's arguments, None where there are none; ValueError or OSError when unreadable."""
    record = Path(folder) / PREDICT_ARGS_FILE
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text())
    return recorded if isinstance(recorded, dict) else {}


def export_label_map(logits: np.ndarray, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                     output_folder: str, case: str, save_probabilities: bool) -> None:
    """nnU-Net's export (the label map; with ``save_probabilities`` also CASE.npz and CASE.pkl) under temporary
    names, renamed once all are written, the label map last; a failed export (a full disk) leaves nothing."""
    from nnunetv2.inference import export_prediction
    ending = dataset_json["file_ending"]
    label_map = os.path.join(output_folder, case + ending)
    partial = partial_name(label_map)[:-len(ending)]  # nnU-Net's export adds the endings
    extra = [".npz", ".pkl"] if save_probabilities else []

    def keep_probabilities() -> None:
        for e in extra:
            os.replace(partial + e, os.path.join(output_folder, case + e))
    try:
        write_atomically(label_map, lambda name: export_prediction.export_prediction_from_logits(
            logits, properties, configuration_manager, plans_manager, dataset_json, name[:-len(ending)],
            save_probabilities), keep_probabilities)
    finally:
        for e in extra:
            if os.path.exists(partial + e):
                os.remove(partial + e)


def save_array(file: Path, key: str, array: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(file, lambda name: np.savez_compressed(name, **{key: array}))  # name ends in .npz


def load_array(file, key: str, expected: str = "") -> np.ndarray:
    """The array ``key`` of the .npz ``file``; a corrupt or truncated file, or one without ``key`` (``expected``
    says what it should hold), is named."""
    try:
        with np.load(file) as data:
            if key not in data:
                raise NnDiffSegError(f"{file} holds no '{key}' array (keys: {', '.join(data.files)})"
                                     + (f"; expected {expected}" if expected else ""))
            return data[key]
    except NnDiffSegError:
        raise
    except Exception as e:  # a corrupt or truncated .npz
        raise NnDiffSegError(f"could not read {file}: {type(e).__name__}: {e}") from None
