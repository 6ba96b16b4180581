"""Which predicted cases to check first, without a reference: ``nnDiffSeg_predict --save_samples`` writes
``case_confidence.json`` beside the predictions, each case's mean Dice between its members (``samples/``: a guided
model's samples, or each fold's mask for a trainer that draws none), least confident first. This is
``nnDiffSeg_evaluate``'s ``pairwise_dice`` source ("ensemble + pairwise Dice", the best case confidence in the DKFZ
segmentation failure-detection benchmark), computed where no reference exists yet."""
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from nndiffseg.evaluation.multirater_metrics import pairwise_dice_per_label
from nndiffseg.files import write_text
from nndiffseg.inference.prediction_folder import SAMPLES_FOLDER

CONFIDENCE_FILE = "case_confidence.json"
SHOWN = 5  # cases printed after prediction


def member_files(output_folder: Path, case: str, file_ending: str) -> list[Path]:
    return sorted((Path(output_folder) / SAMPLES_FOLDER).glob(f"sample_*/{case}{file_ending}"),
                  key=lambda p: int(p.parent.name.split("_")[1]))


def write_case_confidence(output_folder: Path, cases: Iterable[str], file_ending: str, reader) -> Optional[Path]:
    """Score every case with two or more members in ``output_folder/samples``; returns the file written (None
    where no case has two members). A case's score is the mean over the foreground labels any member holds of the
    members' mean pairwise Dice (1 where every member is empty: they agree)."""
    scores = []
    for case in cases:
        files = member_files(output_folder, case, file_ending)
        if len(files) < 2:
            continue
        members = [np.asarray(reader.read_seg(str(f))[0]) for f in files]
        labels = np.unique(np.concatenate([np.unique(m) for m in members]))
        per_label = pairwise_dice_per_label(members, labels)
        scores.append({"case": case, "pairwise_dice": float(np.mean(list(per_label.values()))) if per_label else 1.0,
                       "per_class": {str(k): v for k, v in per_label.items()}, "members": len(members)})
    if not scores:
        return None
    scores.sort(key=lambda s: (s["pairwise_dice"], s["case"]))
    path = Path(output_folder) / CONFIDENCE_FILE
    write_text(path, json.dumps({"source": "mean Dice between the case's members in samples/ (higher: the members "
                                           "agree; check the first cases first)", "cases": scores}, indent=2))
    shown = ", ".join(f"{s['case']} ({s['pairwise_dice']:.2f})" for s in scores[:SHOWN])
    print(f"least agreement between members (pairwise Dice; all {len(scores)} cases in {path}): {shown}")
    return path
