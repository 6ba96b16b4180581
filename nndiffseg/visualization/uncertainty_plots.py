"""Plots of ``nnDiffSeg_evaluate``'s calibration and failure-detection numbers, drawn from summary.json: a
reliability diagram per foreground class and a risk-coverage curve per uncertainty source."""
from typing import Any

import numpy as np

from nndiffseg.evaluation.uncertainty_metrics import risk_coverage
from nndiffseg.visualization.figures import figure_style, save_figure

SOURCE_NAMES = {"entropy": "entropy of the probabilities", "spread": "spread of the samples",
                "pairwise_dice": "1 - pairwise Dice of the members"}


def plot_reliability(summary: dict[str, Any], file: str):
    """Observed fraction of the class against the mean predicted probability per bin, one line per class,
    with each bin's share of the pixels below (most pixels are near 0 or 1). Returns the figure (closed)."""
    calibration = summary["calibration"]["per_class"]
    with figure_style() as plt:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 8), gridspec_kw={"height_ratios": [3, 1]},
                                         sharex=True, layout="constrained")
        top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
        for label, values in calibration.items():
            r = values["reliability"]
            top.plot(r["mean_probability"], r["observed_fraction"], marker="o",
                     label=f"class {label}: ECE {values['ece']:.3f}, Brier {values['brier']:.3f}")
            share = np.asarray(r["pixels"], dtype=float) / max(sum(r["pixels"]), 1)
            bottom.semilogy(r["mean_probability"], share, marker="o", label=f"class {label}")
        top.set_ylabel("fraction of pixels that are the class")
        top.set_title(f"Reliability ({summary['num_cases']} cases, 15 equal-width bins)")
        top.legend(loc="upper left")
        top.grid(alpha=0.3)
        bottom.set_xlabel("predicted probability of the class")
        bottom.set_ylabel("share of pixels")
        bottom.grid(alpha=0.3)
        save_figure(fig, file)
    return fig


def plot_risk_coverage(summary: dict[str, Any], file: str):
    """Mean 1 - Dice of the cases kept, keeping them from the most to the least certain, per uncertainty
    source; the oracle (cases ordered by their true risk) and the mean risk (a random order) for reference.
    The legend sits below the axes, where it covers no curve. Returns the figure (closed)."""
    risks = [1.0 - c["mean"]["dice"] if c["mean"]["dice"] is not None else float("nan") for c in summary["cases"]]
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
        for source, block in summary["uncertainty"].items():
            coverage, risk = risk_coverage(block["case_mean_uncertainty"], risks)
            ax.plot(coverage, risk, marker=".",
                    label=f"{SOURCE_NAMES.get(source, source)}: AURC {block['all_labels']['aurc']:.3f}, "
                          f"Spearman {block['all_labels']['case_spearman']:.2f}")
        coverage, oracle = risk_coverage(risks, risks)
        ax.plot(coverage, oracle, color="grey", linestyle="--", label=f"oracle: AURC {oracle.mean():.3f}")
        ax.axhline(np.nanmean(risks), color="grey", linestyle=":", label="random order")
        ax.set_xlabel("coverage (share of cases kept, most certain first)")
        ax.set_ylabel("risk (mean 1 - Dice of the kept cases)")
        ax.set_title(f"Risk-coverage ({summary['num_cases']} cases)")
        fig.legend(loc="outside lower center")
        ax.grid(alpha=0.3)
        save_figure(fig, file)
    return fig
