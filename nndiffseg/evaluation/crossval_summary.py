"""The cross-validation summary that nnDiffSeg_find_best_configuration writes beside nnU-Net's
inference_instructions.txt: the foreground Dice of every fold and their mean for each model it compared, the
pooled cross-validation Dice nnU-Net selects by (ensembles too), as crossval_summary.md and .json, and a box
plot of the per-case Dice per model (crossval_dice.png).

Where every fold's validation kept its probabilities (``--npz``), the model's row also gets nnDiffSeg_evaluate's
calibration and failure-detection numbers for the softmax entropy of those probabilities, pooled over the
folds' validation cases (``crossval_results_folds_*/uncertainty_summary.json``, with the reliability diagram
and risk-coverage curve in ``summary_figures/`` beside it). Ensembles have none: nnU-Net does not keep their
probabilities."""
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nndiffseg.files import write_json, write_text
from nndiffseg.visualization.figures import figure_style, save_figure

SUMMARY_NAME, PLOT_NAME = "crossval_summary", "crossval_dice.png"


def case_dice(summary: dict) -> List[float]:
    """Each case's Dice averaged over the foreground labels (or regions) it scores; NaN where every label is
    absent from both reference and prediction (nnU-Net's convention)."""
    scores = []
    for case in summary["metric_per_case"]:
        values = [m["Dice"] for m in case["metrics"].values() if m.get("Dice") is not None]
        values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
        scores.append(float(np.mean(values)) if values else float("nan"))
    return scores


UNCERTAINTY_SUMMARY = "uncertainty_summary.json"
UNCERTAINTY_COLUMNS = {"ECE": ("calibration", "ece"), "Brier": ("calibration", "brier"),
                       "pixel AUROC": ("failure_detection", "pixel_auroc"),
                       "case Spearman": ("failure_detection", "case_spearman"), "AURC": ("failure_detection", "aurc")}


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target)
    except OSError:  # file systems without symbolic links
        shutil.copy(source, target)


def pooled_validation_uncertainty(model: Path, folds: Sequence[int], gt_folder: Path,
                                  num_processes: int = 1) -> Optional[dict]:
    """nnDiffSeg_evaluate over every fold's validation cases at once (the probabilities' entropy), written to
    the model's ``crossval_results_folds_*`` folder; None when some fold kept no probabilities."""
    from nndiffseg.evaluation.evaluate import FIGURES_FOLDER, evaluate_folders
    ending = load_json(model / "dataset.json")["file_ending"]
    predictions = {}
    for f in folds:
        validation = model / f"fold_{f}" / "validation"
        for label_map in validation.glob(f"*{ending}"):
            case = label_map.name[:-len(ending)]
            if not (validation / f"{case}.npz").is_file():
                return None
            predictions[case] = validation
    if not predictions:
        return None
    out = model / f"crossval_results_folds_{'_'.join(map(str, folds))}"
    with tempfile.TemporaryDirectory(dir=model, prefix=".uncertainty_") as tmp:
        ref, pred = Path(tmp) / "ref", Path(tmp) / "pred"
        ref.mkdir(), pred.mkdir()
        for case, validation in predictions.items():
            _link(gt_folder / f"{case}{ending}", ref / f"{case}{ending}")
            for name in (f"{case}{ending}", f"{case}.npz"):
                _link(validation / name, pred / name)
        evaluate_folders(str(ref), str(pred), str(Path(tmp) / "summary.json"), num_processes=num_processes, plots=True)
        summary = load_json(Path(tmp) / "summary.json")  # as written: NaN as null
        for entry in summary["cases"]:  # the files themselves, not the links about to go
            entry["reference_file"] = str(gt_folder / Path(entry["reference_file"]).name)
            entry["prediction_file"] = str(predictions[entry["case"]] / Path(entry["prediction_file"]).name)
        summary["reference_folder"], summary["prediction_folder"] = str(gt_folder), str(out)
        out.mkdir(exist_ok=True)
        if (out / FIGURES_FOLDER).exists():
            shutil.rmtree(out / FIGURES_FOLDER)
        shutil.move(str(Path(tmp) / FIGURES_FOLDER), str(out / FIGURES_FOLDER))
    write_json(out / UNCERTAINTY_SUMMARY, summary)
    return {"calibration": summary["calibration"]["mean"],
            "failure_detection": summary["uncertainty"]["entropy"]["all_labels"]}


def collect(results_folder: Path, info: dict, gt_folder: Optional[Path] = None,
            num_processes: int = 1) -> Dict[str, dict]:
    """Per model or ensemble identifier (nnU-Net's): fold Dice (models only), the pooled Dice and per-case Dice,
    and for models whose folds kept probabilities, with ``gt_folder`` given, their pooled uncertainty numbers."""
    folds = info["folds"]
    fold_string = "_".join(map(str, folds))
    rows = {}
    for identifier, pooled in info["all_results"].items():
        if identifier.startswith("ensemble___"):
            source = results_folder / "ensembles" / identifier
            per_fold = {}
        else:
            model = results_folder / identifier
            source = model / f"crossval_results_folds_{fold_string}"
            per_fold = {f: load_json(model / f"fold_{f}" / "validation" / "summary.json")["foreground_mean"]["Dice"]
                        for f in folds}
        rows[identifier] = {"folds": per_fold, "cross_validation_dice": pooled,
                            "mean_of_folds": float(np.mean(list(per_fold.values()))) if per_fold else None,
                            "case_dice": case_dice(load_json(source / "summary.json"))}
        if per_fold and gt_folder is not None:
            uncertainty = pooled_validation_uncertainty(model, folds, gt_folder, num_processes)
            if uncertainty is not None:
                rows[identifier]["softmax_entropy"] = uncertainty
    return rows


def _short(identifier: str) -> str:
    """nnUNetTrainer__nnDiffSegPlans__2d -> nnUNetTrainer (2d); ensembles: A + B."""
    if identifier.startswith("ensemble___"):
        return " +\n".join(_short(m) for m in identifier.split("___")[1:3])
    trainer, _, configuration = identifier.split("__")
    return f"{trainer} ({configuration})"


def _markdown(rows: Dict[str, dict], folds: Sequence[int], best: str) -> str:
    head = "| model | " + " | ".join(f"fold {f}" for f in folds) + " | mean of folds | cross-validation Dice |"
    lines = [head, "|" + " --- |" * (len(folds) + 3)]
    for identifier, row in rows.items():
        cells = [f"{row['folds'][f]:.3f}" if f in row["folds"] else "" for f in folds]
        mean = "" if row["mean_of_folds"] is None else f"{row['mean_of_folds']:.3f}"
        name = _short(identifier).replace("\n", " ")
        mark = " **(selected)**" if identifier == best else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {mean} | {row['cross_validation_dice']:.3f} |")
    scored = {i: r["softmax_entropy"] for i, r in rows.items() if "softmax_entropy" in r}
    if scored:
        lines += ["", "Calibration and failure detection of the validation probabilities (uncertainty: their "
                      "normalised entropy), all folds' validation cases pooled; nnDiffSeg_evaluate's metrics "
                      "(lower ECE, Brier and AURC and higher AUROC and Spearman are better):", "",
                  "| model | " + " | ".join(UNCERTAINTY_COLUMNS) + " |",
                  "|" + " --- |" * (len(UNCERTAINTY_COLUMNS) + 1)]
        for identifier, values in scored.items():
            cells = [values[block][key] for block, key in UNCERTAINTY_COLUMNS.values()]
            lines.append(f"| {_short(identifier)} | " + " | ".join(
                "nan" if v is None or math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Dict[str, dict], file: Path, title: str):
    """The per-case Dice of each model as a box plot with every case on it. Returns the figure (closed)."""
    names = list(rows)
    data = [[d for d in rows[n]["case_dice"] if not math.isnan(d)] for n in names]
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(max(7.0, 2.4 * len(names)), 6.5), layout="constrained")
        ax.boxplot(data, showmeans=True, showfliers=False,
                   meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "k"})
        for i, values in enumerate(data, start=1):  # every case, jittered, so that few cases are not hidden in a box
            ax.scatter(i + np.random.default_rng(i).uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.5,
                       color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), [_short(n) for n in names])
        ax.set_ylabel("Dice per case (mean over foreground labels)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        save_figure(fig, str(file))
    return fig


def write_crossval_summary(results_folder: Path, info: dict, gt_folder: Optional[Path] = None,
                           num_processes: int = 1) -> List[Path]:
    """crossval_summary.md/.json and crossval_dice.png in ``results_folder`` (nnUNet_results/DatasetXXX);
    ``gt_folder`` (nnU-Net's gt_segmentations) adds the uncertainty numbers where the folds kept probabilities."""
    rows = collect(results_folder, info, gt_folder, num_processes)
    best = max(rows, key=lambda k: rows[k]["cross_validation_dice"])
    folds = info["folds"]
    markdown = _markdown(rows, folds, best)
    files = [results_folder / f"{SUMMARY_NAME}.md", results_folder / f"{SUMMARY_NAME}.json", results_folder / PLOT_NAME]
    write_text(files[0], markdown)
    write_json(files[1], rows)
    plot(rows, files[2], f"{results_folder.name}: cross-validation, folds {', '.join(map(str, folds))} "
                         f"(diamond: mean)")
    print("\n***Cross-validation summary***\n")
    print(markdown)
    print(f"written to {files[0]}, {files[1].name} and {files[2].name}")
    return files
