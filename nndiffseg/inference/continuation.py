"""``nnDiffSeg_predict --continue_prediction``: which outputs already in a prediction folder can be kept."""
import json
from pathlib import Path
from typing import Dict, List

from nndiffseg.errors import NnDiffSegError, describe_error
from nndiffseg.inference.prediction_folder import PREDICT_ARGS_FILE, is_predicted, read_record
from nndiffseg.utils import name_list

# what decides a prediction folder's outputs, in its record: --continue_prediction must find them unchanged
OUTPUT_SETTINGS = ("model_folder", "trainer", "plans", "configuration", "folds", "checkpoint_name", "use_tta",
                   "tile_step_size", "inference_options", "save_probabilities", "save_uncertainty", "save_samples",
                   "temperature")
NOT_RECORDED = "(not recorded)"


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_continuation(output_path: Path, record: dict, file_ending: str) -> None:
    """--continue_prediction keeps the outputs already in ``output_path`` only when its record names the model and
    every setting that decides the outputs as ``record`` does (the input folder may differ); outputs without a
    record are refused too, since what made them is unknown. A mix of two models' outputs would pass for one."""
    try:
        recorded = read_record(output_path)
    except (OSError, ValueError) as e:
        raise NnDiffSegError(f"--continue_prediction: {output_path / PREDICT_ARGS_FILE} cannot be read "
                             f"({describe_error(e)})") from None
    if recorded is None:
        outputs = sorted(p.name for p in output_path.glob("*") if p.is_file() and not p.name.startswith(".")
                         and p.name.endswith((file_ending, ".npz"))) if output_path.is_dir() else []
        if outputs:
            raise NnDiffSegError(f"--continue_prediction: {output_path} holds predictions "
                                 f"({name_list(outputs)}) but no {PREDICT_ARGS_FILE} naming the "
                                 f"model and settings that made them: predict into a new folder, or without "
                                 f"--continue_prediction to predict every case again")
        return
    now = json.loads(json.dumps(record, default=str))  # as it would be recorded
    differ = [f"{name}: recorded {_shown(recorded.get(name, NOT_RECORDED))}, now {_shown(now[name])}"
              for name in OUTPUT_SETTINGS if recorded.get(name, NOT_RECORDED) != now[name]]
    if differ:
        raise NnDiffSegError(f"--continue_prediction: {output_path} was predicted with other settings "
                             f"({'; '.join(differ)}): continue with the recorded ones, or predict into a new folder "
                             f"(without --continue_prediction every case is predicted again)")


def skip_predicted(cases: Dict[str, List[str]], output_path: Path, reader, outputs) -> None:
    """--continue_prediction: drop from ``cases`` those whose ``outputs(case)`` are all written and readable."""
    done = [c for c in cases if is_predicted(output_path, outputs(c), reader)]
    again = [c for c in cases if c not in done and (output_path / outputs(c)[0]).exists()]
    for c in done:
        del cases[c]
    if done:
        print(f"--continue_prediction: {len(done)} case(s) already predicted, skipped")
    if again:
        print(f"--continue_prediction: {len(again)} case(s) with an empty, unreadable or incomplete output predicted "
              f"again: {name_list(again)}")
