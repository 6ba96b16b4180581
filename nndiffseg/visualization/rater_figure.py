"""One picture per case of a multi-rater evaluation: the image, each rater's mask and the raters' frequency, then
the prediction and each sample (up to MAX_SAMPLES_SHOWN), as contours on the image."""
from typing import Optional

import numpy as np

from nndiffseg.visualization.figures import figure_style, save_figure
from nndiffseg.visualization.overlay import overlay_contours

MAX_SAMPLES_SHOWN = 16
PANEL_INCHES = 2.2  # about 240 px at FIGURE_DPI: a 128 px slice shown almost twice its size
COLUMNS = 6


def save_rater_figure(file: str, image: np.ndarray, raters: list[np.ndarray], prediction: np.ndarray,
                      samples: list[np.ndarray], title: str, metrics: Optional[dict[str, float]] = None) -> None:
    """2D label maps of one case; ``image`` as ``overlay_contours`` takes it."""
    frequency = np.mean([r > 0 for r in raters], axis=0)
    panels = [("image", overlay_contours(image, np.zeros_like(prediction)), None)]
    panels += [(f"rater {r + 1}", overlay_contours(image, mask), None) for r, mask in enumerate(raters)]
    panels += [("raters' frequency", frequency, "viridis"), ("prediction", overlay_contours(image, prediction), None)]
    panels += [(f"sample {k}", overlay_contours(image, s), None) for k, s in enumerate(samples[:MAX_SAMPLES_SHOWN])]
    rows = -(-len(panels) // COLUMNS)
    with figure_style() as plt:
        fig, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * PANEL_INCHES, rows * (PANEL_INCHES + 0.3) + 0.7),
                                 squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for ax, (name, picture, cmap) in zip(axes.flat, panels):
            ax.imshow(picture, cmap=cmap, vmin=0, vmax=1 if cmap else None, interpolation="nearest")
            ax.set_title(name)
        shown = f" ({len(samples) - MAX_SAMPLES_SHOWN} more samples not shown)" if len(samples) > MAX_SAMPLES_SHOWN \
            else ""
        scores = ", ".join(f"{k} {v:.3f}" for k, v in (metrics or {}).items() if not np.isnan(v))
        fig.suptitle(f"{title}{shown}\n{scores}")
        save_figure(fig, file)
