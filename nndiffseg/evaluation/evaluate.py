"""Evaluate a folder of predicted label maps against a folder of reference label maps.

``nnDiffSeg_evaluate -ref GT_FOLDER -pred PRED_FOLDER [-o summary.json] [-l LABEL ...] [-unc FOLDER] [-np N]``

Scores Dice, IoU and tolerant IoU (see :mod:`nndiffseg.evaluation.metrics`) per case and foreground
class, writes a ``summary.json`` (NaN as ``null``) and prints a table. Where the prediction folder holds
nnU-Net's probabilities (``--save_probabilities``: CASE.npz) and/or nnDiffSeg_predict's uncertainty maps
(``uncertainty/CASE.npz``), it also scores calibration and failure detection
(:mod:`nndiffseg.evaluation.uncertainty_metrics`) and draws them as ``summary_figures/calibration.png`` and
``summary_figures/risk_coverage.png`` beside the summary. With ``-raters FOLDER`` (several raters per case) it
also scores the prediction's samples against the raters (:mod:`nndiffseg.evaluation.rater_evaluation`) and draws
each case's image, raters and samples as ``summary_figures/raters/CASE.png``.
"""
import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from typing import Any, Iterable, Optional, Type

import numpy as np
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES, determine_reader_writer_from_file_ending

from nndiffseg.errors import NnDiffSegError, run_cli
from nndiffseg.evaluation.metrics import METRIC_NAMES, compute_case_metrics
from nndiffseg.evaluation.rater_evaluation import (
    case_rater_metrics,
    find_rater_files,
    find_sample_files,
    summarize_raters,
)
from nndiffseg.evaluation.uncertainty_evaluation import (
    PROBABILITIES_KEY,
    case_uncertainty_data,
    find_case_files,
    load_case_array,
    summarize_uncertainty,
)
from nndiffseg.files import write_json
from nndiffseg.inference.prediction_folder import UNCERTAINTY_FOLDER, UNCERTAINTY_KEY
from nndiffseg.utils import name_list

# Longest first, so that "x.nii.gz" is split as ("x", ".nii.gz"), never as ("x.nii", ".gz")-like guesses.
SUPPORTED_ENDINGS: tuple[str, ...] = tuple(sorted({e.lower() for rw in LIST_OF_IO_CLASSES
                                                   for e in rw.supported_file_endings}, key=len, reverse=True))
SUMMARY_FILE_NAME = "summary.json"
FIGURES_FOLDER = "summary_figures"  # calibration.png and risk_coverage.png, beside the summary


def default_num_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def split_case_name(file_name: str) -> Optional[tuple[str, str]]:
    """``("case", ".nii.gz")`` for ``"case.nii.gz"``; None when the ending is not a label-map ending."""
    lower = file_name.lower()
    for ending in SUPPORTED_ENDINGS:
        if lower.endswith(ending) and len(file_name) > len(ending):
            return file_name[:-len(ending)], ending
    return None


def list_cases(folder: str, role: str = "label map") -> dict[str, str]:
    """Case name -> file path for the label maps directly inside ``folder`` (other files ignored)."""
    if not os.path.isdir(folder):
        raise NnDiffSegError(f"{role} folder not found: {folder}")
    cases: dict[str, str] = {}
    for file_name in sorted(os.listdir(folder)):
        path = os.path.join(folder, file_name)
        split = split_case_name(file_name)
        if split is None or not os.path.isfile(path):
            continue
        case = split[0]
        if case in cases:
            raise NnDiffSegError(f"case {case!r} appears twice in {folder}: "
                                 f"{os.path.basename(cases[case])} and {file_name}")
        cases[case] = path
    if not cases:
        raise NnDiffSegError(f"no label maps found in {folder} (looked for files ending in "
                             f"{', '.join(sorted(SUPPORTED_ENDINGS))})")
    return cases


def _match_cases(reference: dict[str, str], prediction: dict[str, str],
                 reference_folder: str, prediction_folder: str) -> list[str]:
    missing = sorted(set(reference) - set(prediction))
    extra = sorted(set(prediction) - set(reference))
    problems = [f"{len(names)} {what}: {name_list(names)}" for names, what in [
        (missing, f"case(s) of {reference_folder} have no prediction in {prediction_folder}"),
        (extra, f"prediction(s) in {prediction_folder} have no reference in {reference_folder}")] if names]
    if problems:
        raise NnDiffSegError("; ".join(problems))
    return sorted(reference)


def _reader_for_ending(ending: str, example_file: str) -> Type[BaseReaderWriter]:
    # nnU-Net prints a traceback for every reader that fails on the example file even with
    # verbose=False (e.g. NaturalImage2DIO on a 3D .tif before Tiff3DIO succeeds): keep that quiet.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return determine_reader_writer_from_file_ending(ending, example_file, verbose=False)
        except RuntimeError:
            pass
    raise NnDiffSegError(f"no nnU-Net reader can read {example_file}")


def _read_label_map(reader: Type[BaseReaderWriter], file: str) -> tuple[np.ndarray, np.ndarray]:
    """The label map (channel axis removed; 2D images come as shape (1, X, Y)) and its unique values."""
    try:
        seg, _ = reader().read_seg(file)
    except Exception as e:  # any reader failure is a bad input file, reported with its name
        raise NnDiffSegError(f"could not read label map {file}: {type(e).__name__}: {e}") from None
    if seg.shape[0] != 1:
        raise NnDiffSegError(f"{file} is not a label map: it has {seg.shape[0]} channels (e.g. an RGB image), "
                             f"expected 1")
    seg = seg[0]
    values = np.unique(seg)
    if not np.issubdtype(values.dtype, np.integer) and not np.all(np.mod(values, 1) == 0):
        raise NnDiffSegError(f"{file} is not a label map: it holds non-integer values")
    return seg, values


def _read_alike(reader: Type[BaseReaderWriter], file: str, ref: np.ndarray, ref_file: str, case: str) -> np.ndarray:
    seg = _read_label_map(reader, file)[0]
    if seg.shape != ref.shape:
        raise NnDiffSegError(f"case {case}: reference {ref_file} has shape {ref.shape} but {file} has shape "
                             f"{seg.shape}")
    return seg


def _rater_scores(case: str, ref: np.ndarray, ref_file: str, pred: np.ndarray, samples: list[np.ndarray],
                  job: tuple) -> dict[str, Any]:
    """The case's scores against its raters (its samples, or the prediction as the one sample), and its picture
    where ``figure`` (image file, its reader, the picture's file) is given."""
    _, _, ref_reader, _, _, _, probability_file, uncertainty_file, rater_job, _ = job
    labels, figure = rater_job["labels"], rater_job["figure"]
    raters = [_read_alike(ref_reader, f, ref, ref_file, case) for f in rater_job["raters"]]
    samples = samples or [pred]
    probabilities = None if probability_file is None else \
        load_case_array(probability_file, PROBABILITIES_KEY, ref.shape, "class probabilities")
    uncertainty = None if uncertainty_file is None else \
        load_case_array(uncertainty_file, UNCERTAINTY_KEY, ref.shape, "an uncertainty map").reshape(ref.shape)
    scores = case_rater_metrics(pred, raters, samples, labels, probabilities, uncertainty)
    if figure is not None and ref.ndim == 3 and ref.shape[0] == 1:
        from nndiffseg.visualization.rater_figure import save_rater_figure
        image_file, image_reader, out = figure
        image = image_reader().read_images([image_file])[0][:, 0]
        label = str(labels[0])
        save_rater_figure(out, np.moveaxis(image, 0, -1), [r[0] for r in raters], pred[0], [s[0] for s in samples],
                          case, {k: scores[label][k] for k in ("ged_squared", "hm_iou", "sample_diversity")})
    return scores


def _evaluate_case(job: tuple) -> dict[str, Any]:
    case, ref_file, ref_reader, pred_file, pred_reader, labels, probability_file, uncertainty_file = job[:8]
    ref, ref_values = _read_label_map(ref_reader, ref_file)
    pred = _read_alike(pred_reader, pred_file, ref, ref_file, case)
    samples = [_read_alike(pred_reader, f, ref, ref_file, case) for f in job[9]]
    pred_values = np.unique(pred)
    present = sorted({int(v) for v in np.concatenate([ref_values, pred_values]) if v != 0})
    # Without explicit labels, score what occurs in this case; the caller fills in the labels that
    # occur elsewhere only, whose metrics here are NaN by definition (empty in both maps).
    metrics = compute_case_metrics(pred, ref, present if labels is None else labels)
    return {"case": case, "present": present, "metrics": metrics,
            "reference_labels": sorted(int(v) for v in ref_values),
            "prediction_labels": sorted(int(v) for v in pred_values),
            **({"raters": _rater_scores(case, ref, ref_file, pred, samples, job)} if job[8] is not None else {}),
            **case_uncertainty_data(case, ref, pred, probability_file, uncertainty_file, samples)}


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def defined_labels(reference_folder: str, prediction_folder: str) -> Optional[tuple[set[int], str]]:
    """The label values a dataset.json beside the references (in their folder or its parent, as in an nnU-Net
    raw dataset) or in the prediction folder defines, with that file; None without one (or with regions)."""
    for folder in (reference_folder, os.path.dirname(os.path.abspath(reference_folder)), prediction_folder):
        file = os.path.join(folder, "dataset.json")
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                labels = json.load(f).get("labels")
        except (ValueError, OSError, AttributeError) as e:
            raise NnDiffSegError(f"{file} is not a readable dataset.json ({type(e).__name__}: {e})") from None
        if isinstance(labels, dict) and all(isinstance(v, int) for v in labels.values()):
            return set(labels.values()), file
    return None


MASK_255 = 255  # the foreground of a binary mask saved as an 8-bit picture


def _stray(results: list[dict], key: str, allowed: set[int], files: dict[str, str]) -> tuple[dict, list[str]]:
    """Per case its labels under ``key`` (reference_labels, prediction_labels) outside ``allowed``, where it has
    any, and those cases named with their file."""
    stray = {r["case"]: sorted(set(r[key]) - allowed) for r in results}
    stray = {case: values for case, values in stray.items() if values}
    return stray, [f"{case} ({files[case]}: label {', '.join(map(str, values))})" for case, values in stray.items()]


def _stray_labels(results: list[dict], reference_folder: str, prediction_folder: str,
                  prediction: dict[str, str], reference: dict[str, str]) -> list[str]:
    """Labels the dataset does not define. References first, before the predictions are blamed for the mismatch:
    labels that a dataset.json beside them does not define or, without one, the foreground 255 of a 0/255 mask,
    named in an error. Then predictions: an error naming the cases where a dataset.json defines the labels;
    otherwise (labels found in no reference) warnings, kept in the summary and printed with the table."""
    defined = defined_labels(reference_folder, prediction_folder)
    undefined = f"that {defined[1]} does not define (its labels: {', '.join(map(str, sorted(defined[0])))})" \
        if defined else None
    in_references = {v for r in results for v in r["reference_labels"]}
    stray, cases = _stray(results, "reference_labels", defined[0] if defined else in_references - {MASK_255},
                          reference)
    if stray:
        what = undefined or f"{MASK_255} (and no dataset.json beside them defines it)"
        hint = (f": masks saved as 0/{MASK_255} must be saved as 0/1 (a label map holds class numbers)"
                if any(MASK_255 in values for values in stray.values()) else "")
        raise NnDiffSegError(f"{len(stray)} reference(s) hold labels {what}: {name_list(cases)}{hint}")
    stray, cases = _stray(results, "prediction_labels", defined[0] if defined else {0} | in_references, prediction)
    if not stray:
        return []
    if defined:
        raise NnDiffSegError(f"{len(stray)} prediction(s) hold labels {undefined}: {name_list(cases)}")
    return [f"label(s) {', '.join(map(str, sorted({v for vs in stray.values() for v in vs})))} occur in predictions "
            f"but in no reference, so they count as wrong classes in the means: {name_list(cases)}"]


def _check_labels(labels: Optional[Iterable[int]]) -> Optional[list[int]]:
    if labels is None:
        return None
    checked = sorted({int(label) for label in labels})
    if not checked:
        raise NnDiffSegError("the list of labels to score is empty")
    if any(label <= 0 for label in checked):
        raise NnDiffSegError(f"labels to score must be foreground labels > 0 (0 is background), got {checked}")
    return checked


def _rater_jobs(raters_folder: str, images_folder: Optional[str], cases: list[str], ending: str,
                labels: Optional[list[int]], figures: Optional[str]) -> dict[str, dict]:
    """Case -> what its rater scores need: rater files, the labels (default: every label a rater marks), and its
    picture's image and file where ``figures`` (a folder) is given."""
    raters = find_rater_files(raters_folder, cases, ending)
    reader = _reader_for_ending(ending, raters[cases[0]][0])
    if labels is None:
        labels = sorted({int(v) for files in raters.values() for f in files for v in _read_label_map(reader, f)[1]
                         if v > 0}) or [1]
    images = {}
    if figures is not None and images_folder is not None and os.path.isdir(images_folder):
        images = {c: os.path.join(images_folder, f"{c}_0000{ending}") for c in cases}
        images = {c: f for c, f in images.items() if os.path.isfile(f)}
        if images:
            os.makedirs(figures, exist_ok=True)
            image_reader = _reader_for_ending(ending, next(iter(images.values())))
    return {c: {"raters": raters[c], "labels": labels,
                "figure": (images[c], image_reader, os.path.join(figures, f"{c}.png")) if c in images else None}
            for c in cases}


def evaluate_folders(reference_folder: str, prediction_folder: str, output_file: Optional[str] = None,
                     labels: Optional[Iterable[int]] = None,
                     num_processes: int = default_num_processes(), uncertainty_folder: Optional[str] = None,
                     plots: bool = True, raters_folder: Optional[str] = None,
                     images_folder: Optional[str] = None) -> dict[str, Any]:
    """Score every prediction in ``prediction_folder`` against the same-named reference and write a summary.

    Case files are matched by name (file name minus its ending); files with other endings and subfolders
    are ignored. ``labels`` defaults to every foreground value found in any reference or prediction.
    Per class, metrics are averaged over cases ignoring NaN (class empty in both maps); ``mean`` averages
    the per-class values over classes, again ignoring NaN. The summary is written to ``output_file``
    (default ``prediction_folder/summary.json``) with NaN as ``null``; the returned dict keeps NaN floats.

    Probabilities (``prediction_folder/CASE.npz``, nnU-Net's ``--save_probabilities``) and uncertainty maps
    (``uncertainty_folder/CASE.npz``, default ``prediction_folder/uncertainty``) are used when every case has
    one: the summary then holds ``calibration`` and ``uncertainty`` blocks, and with ``plots`` the reliability
    diagram and risk-coverage curve are written to ``summary_figures/`` beside it. Samples
    (``prediction_folder/samples/sample_K/CASE``, two or more) add the ``pairwise_dice`` source: a case's
    uncertainty is 1 - the mean Dice between its members.

    ``raters_folder`` (``CASE_raterNN<ending>`` files) adds each case's scores against its raters (its samples,
    ``prediction_folder/samples/sample_K``, or the prediction as the one sample) and a ``raters`` block; with
    ``plots`` and ``images_folder`` (``CASE_0000<ending>``, default: the ``images*`` folder beside a
    ``labels*`` reference folder) a picture per case in ``summary_figures/raters/``.

    Raises NnDiffSegError for missing or extra cases, empty folders, unreadable files and shape mismatches,
    before anything is written.
    """
    if num_processes < 1:
        raise NnDiffSegError(f"the number of processes must be at least 1, got {num_processes}")
    if output_file is not None and os.path.isdir(output_file):
        raise NnDiffSegError(f"-o {output_file} is a folder; give the summary's file name, e.g. "
                             f"{os.path.join(output_file, SUMMARY_FILE_NAME)}")
    if output_file is not None and os.path.exists(os.path.dirname(os.path.abspath(output_file))) and \
            not os.path.isdir(os.path.dirname(os.path.abspath(output_file))):
        raise NnDiffSegError(f"-o {output_file}: {os.path.dirname(output_file)} is a file, not a folder")
    labels = _check_labels(labels)
    if os.path.isdir(reference_folder) and os.path.realpath(reference_folder) == os.path.realpath(prediction_folder):
        raise NnDiffSegError(f"-ref and -pred are the same folder ({os.path.realpath(reference_folder)}): every "
                             f"case would score 1 against itself")
    reference = list_cases(reference_folder, "reference")
    prediction = list_cases(prediction_folder, "prediction")
    cases = _match_cases(reference, prediction, reference_folder, prediction_folder)

    endings = {file: split_case_name(os.path.basename(file))[1]
               for file in [reference[c] for c in cases] + [prediction[c] for c in cases]}
    readers: dict[str, Type[BaseReaderWriter]] = {}  # per ending, found with the first file that has it
    for file, ending in endings.items():
        if ending not in readers:
            readers[ending] = _reader_for_ending(ending, file)

    if uncertainty_folder is not None and not os.path.isdir(uncertainty_folder):
        raise NnDiffSegError(f"uncertainty folder not found: {uncertainty_folder}")
    probability_files = find_case_files(prediction_folder, cases, "probability") or {}
    uncertainty_files = find_case_files(uncertainty_folder or os.path.join(prediction_folder, UNCERTAINTY_FOLDER),
                                        cases, "uncertainty") or {}
    if uncertainty_folder is not None and not uncertainty_files:
        raise NnDiffSegError(f"no uncertainty maps (CASE.npz) in {uncertainty_folder}")
    if output_file is None:
        output_file = os.path.join(prediction_folder, SUMMARY_FILE_NAME)
    figures = os.path.join(os.path.dirname(os.path.abspath(output_file)), FIGURES_FOLDER)
    rater_figures = os.path.join(figures, "raters")
    new_figures = not os.path.exists(rater_figures)
    rater_jobs = {}
    prediction_ending = endings[prediction[cases[0]]]
    if raters_folder is not None:
        parent, name = os.path.split(os.path.abspath(reference_folder))
        if images_folder is None and name.startswith("labels"):
            images_folder = os.path.join(parent, "images" + name[len("labels"):])
        rater_jobs = _rater_jobs(raters_folder, images_folder, cases, prediction_ending, labels,
                                 rater_figures if plots else None)
    sample_files = find_sample_files(prediction_folder, cases, prediction_ending) or {}
    jobs = [(c, os.path.abspath(reference[c]), readers[endings[reference[c]]], os.path.abspath(prediction[c]),
             readers[endings[prediction[c]]], labels, probability_files.get(c), uncertainty_files.get(c),
             rater_jobs.get(c), sample_files.get(c, [])) for c in cases]
    try:
        if num_processes == 1 or len(jobs) == 1:
            results = [_evaluate_case(job) for job in jobs]
        else:
            # spawn, as nnU-Net does: forking a process that may hold torch threads can deadlock.
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                results = pool.map(_evaluate_case, jobs)
        warnings = _stray_labels(results, reference_folder, prediction_folder, prediction, reference)
    except BaseException:  # the cases' pictures drawn so far go with the run that failed
        if new_figures:
            shutil.rmtree(rater_figures, ignore_errors=True)
        raise
    if labels is None:
        labels = sorted({label for r in results for label in r["present"]})
        if not labels:
            raise NnDiffSegError(f"no foreground labels in any reference or prediction "
                                 f"({reference_folder}, {prediction_folder}); pass -l to score given labels")
    nan_metrics = {m: float("nan") for m in METRIC_NAMES}

    case_entries = []
    for r in results:
        metrics = {str(label): dict(r["metrics"].get(label, nan_metrics)) for label in labels}
        case_entries.append({
            "case": r["case"],
            "reference_file": os.path.abspath(reference[r["case"]]),
            "prediction_file": os.path.abspath(prediction[r["case"]]),
            "metrics": metrics,
            "mean": {m: _nanmean(metrics[str(label)][m] for label in labels) for m in METRIC_NAMES},
            **({"mean_uncertainty": r["mean_uncertainty"]} if r["mean_uncertainty"] else {}),
            **({"raters": r["raters"]} if "raters" in r else {}),
        })
    per_class = {str(label): {m: _nanmean(c["metrics"][str(label)][m] for c in case_entries) for m in METRIC_NAMES}
                 for label in labels}
    summary = {
        "mean": {m: _nanmean(per_class[str(label)][m] for label in labels) for m in METRIC_NAMES},
        "per_class": per_class,
        "cases": case_entries,
        "labels": labels,
        "num_cases": len(case_entries),
        # Cases where the class is empty in both reference and prediction: NaN, left out of the means.
        "num_nan": {str(label): sum(math.isnan(c["metrics"][str(label)]["dice"]) for c in case_entries)
                    for label in labels},
        "reference_folder": os.path.abspath(reference_folder),
        "prediction_folder": os.path.abspath(prediction_folder),
        **summarize_uncertainty(results, case_entries, labels),
        **({"raters": summarize_raters(case_entries, rater_jobs[cases[0]]["labels"])} if rater_jobs else {}),
        **({"warnings": warnings} if warnings else {}),
    }
    if plots and ("calibration" in summary or "uncertainty" in summary):
        from nndiffseg.visualization.uncertainty_plots import plot_reliability, plot_risk_coverage
        # a folder of their own: beside PNG label maps they would pass for cases of the prediction folder
        os.makedirs(figures, exist_ok=True)
        if "calibration" in summary:
            plot_reliability(summary, os.path.join(figures, "calibration.png"))
        if "uncertainty" in summary:
            plot_risk_coverage(summary, os.path.join(figures, "risk_coverage.png"))
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    write_json(output_file, _nan_to_none(summary))
    return summary


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


def format_table(summary: dict[str, Any]) -> str:
    """Fixed-width text table: each case's mean over classes, then each class's mean, then the overall mean."""
    rows: list[tuple[str, dict]] = [(c["case"], c["mean"]) for c in summary["cases"]]
    class_rows = [(f"class {label}", values) for label, values in summary["per_class"].items()]
    name_width = max(len(name) for name, _ in rows + class_rows + [("case (mean over classes)", {})])
    header = f"{'case (mean over classes)':<{name_width}}" + "".join(f"{h:>8}" for h in ("Dice", "IoU", "tIoU"))
    rule = "-" * len(header)

    def line(name: str, values: dict) -> str:
        return f"{name:<{name_width}}" + "".join(f"{_fmt(values[m]):>8}" for m in METRIC_NAMES)

    return "\n".join([header, rule, *(line(n, v) for n, v in rows), rule, *(line(n, v) for n, v in class_rows),
                      rule, line("mean", summary["mean"]), *(f"WARNING: {w}" for w in summary.get("warnings", []))])


def format_uncertainty_table(summary: dict[str, Any]) -> str:
    """Calibration per class and failure detection per uncertainty source; empty without either."""
    lines = []
    if "calibration" in summary:
        lines += ["", f"{'calibration':<16}{'ECE':>8}{'Brier':>8}"]
        rows = [(f"class {k}", v) for k, v in summary["calibration"]["per_class"].items()]
        lines += [f"{name:<16}{_fmt(v['ece']):>8}{_fmt(v['brier']):>8}"
                  for name, v in rows + [("mean", summary["calibration"]["mean"])]]
    if "uncertainty" in summary:
        header = ("pixel AUROC", "overlap", "Spearman", "AURC")
        lines += ["", f"{'failure detection':<24}" + "".join(f"{h:>12}" for h in header)]
        for source, block in summary["uncertainty"].items():
            for name, values in [*block["per_class"].items(), ("all labels", block["all_labels"])]:
                label = f"{source}, {'class ' + name if name != 'all labels' else name}"
                lines.append(f"{label:<24}" + "".join(f"{_fmt(values[m]):>12}" for m in
                                                      ("pixel_auroc", "uncertainty_error_overlap", "case_spearman",
                                                       "aurc")))
    return "\n".join(lines)


def format_rater_table(summary: dict[str, Any]) -> str:
    """The scores against the raters per class; empty without raters."""
    if "raters" not in summary:
        return ""
    shown = ("ged_squared", "hm_iou", "sample_diversity", "dice_majority", "dice_raters_mean", "ece", "ncc")
    titles = ("GED²", "HM-IoU", "diversity", "Dice maj.", "Dice raters", "ECE", "NCC")
    block = summary["raters"]
    rows = [(f"class {k}", v) for k, v in block["per_class"].items()] + [("mean", block["mean"])]
    return "\n".join(["", f"{'against the raters':<20}" + "".join(f"{t:>12}" for t in titles)] +
                     [f"{name:<20}" + "".join(f"{_fmt(v[m]):>12}" for m in shown) for name, v in rows])


def evaluate_entry() -> None:
    parser = argparse.ArgumentParser(
        prog="nnDiffSeg_evaluate",
        description="Dice, IoU and tolerant IoU (3x3 tolerance) of predicted label maps against references; with "
                    "probabilities or uncertainty maps also calibration (ECE, Brier) and failure detection (pixel "
                    "AUROC, uncertainty-error overlap, case Spearman, AURC). Files are matched by case name (file "
                    "name minus its ending).")
    parser.add_argument("-ref", required=True, help="folder with the reference (ground truth) label maps")
    parser.add_argument("-pred", required=True, help="folder with the predicted label maps")
    parser.add_argument("-o", default=None,
                        help=f"output JSON file (default: PRED_FOLDER/{SUMMARY_FILE_NAME})")
    parser.add_argument("-l", type=int, nargs="+", default=None,
                        help="foreground labels to score (default: every label > 0 found in any file)")
    parser.add_argument("-unc", default=None,
                        help=f"folder of uncertainty maps CASE.npz (default: PRED_FOLDER/{UNCERTAINTY_FOLDER} when it "
                             f"exists). Probabilities are read from PRED_FOLDER/CASE.npz (--save_probabilities) when "
                             f"every case has them")
    parser.add_argument("-raters", default=None,
                        help="folder of several raters' masks per case, CASE_rater01<ending>, ... (ratersTr or "
                             "ratersTs of nnDiffSeg_convert_multirater): also scores the prediction's samples "
                             "(PRED_FOLDER/samples/, nnDiffSeg_predict --save_samples; else the prediction) against "
                             "them: GED, HM-IoU, diversity, Dice against the majority and each rater, calibration "
                             "against the raters' frequency, NCC of the uncertainty with their disagreement")
    parser.add_argument("-img", default=None,
                        help="images CASE_0000<ending> for the pictures of -raters (default: imagesTr/imagesTs beside "
                             "a labelsTr/labelsTs -ref folder)")
    parser.add_argument("--no_plots", action="store_true",
                        help=f"do not draw {FIGURES_FOLDER}/calibration.png and risk_coverage.png beside the summary")
    parser.add_argument("-np", type=int, default=default_num_processes(),
                        help="processes for reading and scoring (default: min(4, CPU count)); 1 = sequential")
    args = parser.parse_args()

    def main() -> int:
        summary = evaluate_folders(args.ref, args.pred, args.o, args.l, args.np, args.unc, not args.no_plots,
                                   args.raters, args.img)
        print(format_table(summary))
        for warning in summary.get("warnings", []):
            print(f"WARNING: {warning}", file=sys.stderr)
        print(format_uncertainty_table(summary))
        print(format_rater_table(summary))
        output = args.o if args.o is not None else os.path.join(args.pred, SUMMARY_FILE_NAME)
        print(f"\nSummary written to {output}")
        return 0

    run_cli(main)


if __name__ == "__main__":
    evaluate_entry()
