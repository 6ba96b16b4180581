"""``nnDiffSeg_apply_postprocessing``: nnU-Net's postprocessing (the connected-component rules that
``nnDiffSeg_find_best_configuration`` chose, in its postprocessing.pkl) applied to a prediction folder.

The rules and their application are nnunetv2's; what this adds: the folder, the .pkl and the plans/dataset.json
are checked before any work (each error names the file), the output may not be the input, and plans.json and
dataset.json are written beside the result so it stays a prediction folder."""
import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Optional

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.inference.prediction_folder import write_record


def _load_json(path: Path, flag: str) -> dict:
    if not path.is_file():
        raise NnDiffSegError(f"{path} not found ({flag}); a folder written by nnDiffSeg_predict, nnDiffSeg_ensemble or "
                             f"nnUNetv2_predict holds it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NnDiffSegError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def apply_postprocessing(input_folder: str, output_folder: str, pp_pkl_file: str, num_processes: int = 2,
                         plans_json: Optional[str] = None, dataset_json: Optional[str] = None) -> None:
    source, out, pkl = Path(input_folder), Path(output_folder), Path(pp_pkl_file)
    if not source.is_dir():
        raise NnDiffSegError(f"input folder {source} does not exist")
    if out.exists() and not out.is_dir():
        raise NnDiffSegError(f"-o {out} is a file, not a folder")
    if out.resolve() == source.resolve():
        raise NnDiffSegError("the output folder must differ from the input folder (the input stays as predicted)")
    if num_processes < 1:
        raise NnDiffSegError(f"-np must be at least 1, got {num_processes}")
    plans = _load_json(Path(plans_json) if plans_json else source / "plans.json", "-plans_json")
    dataset = _load_json(Path(dataset_json) if dataset_json else source / "dataset.json", "-dataset_json")
    if not pkl.is_file():
        raise NnDiffSegError(f"postprocessing file {pkl} not found (-pp_pkl_file; nnDiffSeg_find_best_configuration "
                             f"writes it beside the selected model's cross-validation results)")
    try:
        with open(pkl, "rb") as f:
            pp_fns, pp_fn_kwargs = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise NnDiffSegError(f"{pkl} is not a postprocessing file of nnU-Net ({type(e).__name__}: {e})") from None
    if not any(f.name.endswith(dataset["file_ending"]) for f in source.iterdir()):
        raise NnDiffSegError(f"no predictions ({dataset['file_ending']}) in {source}")
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder
    rules = ", ".join(f"{fn.__name__}({kw})" for fn, kw in zip(pp_fns, pp_fn_kwargs)) or "none (copies the labels)"
    print(f"Postprocessing {source} into {out}: {rules}")
    apply_postprocessing_to_folder(str(source), str(out), pp_fns, pp_fn_kwargs, plans, dataset, num_processes)
    write_record(out, dataset, plans, {"postprocessed_from": str(source.resolve()), "pp_pkl_file": str(pkl.resolve())})


def apply_postprocessing_entry() -> None:
    parser = argparse.ArgumentParser(description="Apply the postprocessing chosen by nnDiffSeg_find_best_configuration "
                                                 "(postprocessing.pkl) to a prediction folder")
    parser.add_argument("-i", required=True, help="prediction folder")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-pp_pkl_file", required=True, help="postprocessing.pkl")
    parser.add_argument("-np", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    parser.add_argument("-plans_json", default=None, help="plans.json (default: the one in the input folder)")
    parser.add_argument("-dataset_json", default=None, help="dataset.json (default: the one in the input folder)")
    args = parser.parse_args()
    run_cli(lambda: apply_postprocessing(args.i, args.o, args.pp_pkl_file, args.np, args.plans_json,
                                         args.dataset_json))


if __name__ == "__main__":
    apply_postprocessing_entry()
