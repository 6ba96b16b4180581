"""The project's figures keep their layout whatever the process drew before: nnU-Net's progress plot sets
seaborn's theme with font_scale=2.5 for the whole process (the demo draws its figures in the process that has
just trained), which cut titles and legends and squeezed the axes. Each figure is drawn in its own style and
leaves the process's style as it found it."""
import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from nndiffseg.evaluation.crossval_summary import plot as plot_crossval
from nndiffseg.visualization.figures import FIGURE_STYLE
from nndiffseg.visualization.overlay import MIN_PANEL_WIDTH, write_overlays
from nndiffseg.visualization.uncertainty_plots import plot_reliability, plot_risk_coverage

matplotlib.use("Agg")


def nnunet_progress_plot(folder) -> None:
    """nnU-Net's own progress.png after three epochs, as its trainer draws it at the end of every epoch."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    logger = LocalLogger()
    for epoch in range(3):
        for key, value in (("mean_fg_dice", 0.5), ("ema_fg_dice", 0.5), ("dice_per_class_or_region", [0.5]),
                           ("train_losses", -0.3), ("val_losses", -0.2), ("lrs", 0.01),
                           ("epoch_start_timestamps", epoch), ("epoch_end_timestamps", epoch + 0.5)):
            logger.log(key, value, epoch)
    logger.plot_progress_png(str(folder))


def summary(num_cases: int = 12) -> dict:
    rng = np.random.default_rng(0)
    bins = np.linspace(0.03, 0.97, 15)
    dice = rng.uniform(0.4, 1.0, num_cases)
    return {
        "num_cases": num_cases,
        "calibration": {"per_class": {"1": {"ece": 0.031, "brier": 0.052, "reliability": {
            "mean_probability": bins.tolist(), "observed_fraction": np.clip(bins + 0.05, 0, 1).tolist(),
            "pixels": rng.integers(10, 10000, 15).tolist()}}}},
        "cases": [{"mean": {"dice": float(d)}} for d in dice],
        "uncertainty": {source: {"case_mean_uncertainty": (1 - dice + rng.normal(0, s, num_cases)).tolist(),
                                 "all_labels": {"aurc": 0.123, "case_spearman": 0.45}}
                        for source, s in (("entropy", 0.1), ("spread", 0.3))},
    }


def crossval_rows() -> dict:
    rng = np.random.default_rng(1)
    names = ["nnUNetTrainer__nnDiffSegPlans__2d", "nnDiffSegTrainerGuided__nnDiffSegPlans__2d",
             "ensemble___nnUNetTrainer__nnDiffSegPlans__2d___nnDiffSegTrainerGuided__nnDiffSegPlans__2d___0_1_2_3_4"]
    return {n: {"case_dice": rng.uniform(0.5, 0.95, 20).tolist()} for n in names}


def assert_readable(fig, main_axes, min_share: float) -> None:
    """Everything drawn (every text) inside the figure, the main axes at least ``min_share`` of its area, the
    project's font sizes."""
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed: its canvas is gone
    drawn, frame = fig.get_tightbbox(renderer), fig.bbox_inches  # everything drawn (text included), in inches
    assert (drawn.x0 >= frame.x0 - 0.01 and drawn.y0 >= frame.y0 - 0.01 and drawn.x1 <= frame.x1 + 0.01
            and drawn.y1 <= frame.y1 + 0.01), (drawn, frame)
    position = main_axes.get_position()
    assert position.width * position.height >= min_share, position
    assert main_axes.title.get_fontsize() == FIGURE_STYLE["axes.titlesize"]
    for label in (main_axes.xaxis.label, main_axes.yaxis.label):
        if label.get_text():
            assert label.get_fontsize() == FIGURE_STYLE["axes.labelsize"]
    for tick in main_axes.get_yticklabels():
        assert tick.get_fontsize() == FIGURE_STYLE["ytick.labelsize"]
    for legend in [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend())]:
        for text in legend.get_texts():
            assert text.get_fontsize() == FIGURE_STYLE["legend.fontsize"]


def test_figures_keep_their_layout_after_nnunets_progress_plot(tmp_path):
    with matplotlib.rc_context():  # this test's process-wide theme ends with it
        nnunet_progress_plot(tmp_path)
        assert matplotlib.rcParams["font.size"] > 2 * FIGURE_STYLE["font.size"]  # seaborn's theme is set
        process_style = dict(matplotlib.rcParams)
        reliability = plot_reliability(summary(), str(tmp_path / "calibration.png"))
        risk_coverage = plot_risk_coverage(summary(), str(tmp_path / "risk_coverage.png"))
        crossval = plot_crossval(crossval_rows(), tmp_path / "crossval_dice.png",
                                 "Dataset041_Toy: cross-validation, folds 0, 1, 2, 3, 4 (diamond: mean)")
        changed = {k: (v, matplotlib.rcParams[k]) for k, v in process_style.items()
                   if matplotlib.rcParams[k] != v and k != "backend"}  # 'agg' and 'Agg' are the same backend
        assert not changed  # left as found
    assert_readable(reliability, reliability.axes[0], 0.35)
    assert_readable(risk_coverage, risk_coverage.axes[0], 0.4)
    assert_readable(crossval, crossval.axes[0], 0.5)
    for name in ("calibration.png", "risk_coverage.png", "crossval_dice.png"):
        with Image.open(tmp_path / name) as png:
            assert 600 <= png.width <= 1200 and 500 <= png.height <= 1000, (name, png.size)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("size", [(96, 128), (600, 800)])
def test_overlays_are_enlarged_and_their_legend_is_small(tmp_path, size):
    """The demo's 96 x 128 px cases were written at their pixel size with a legend as tall as a fifth of the
    picture; now a panel is at least MIN_PANEL_WIDTH wide (whole-pixel enlargement), a large image keeps its
    size, and the legend is a thin strip."""
    height, width = size
    for folder in ("images", "pred", "ref"):
        (tmp_path / folder).mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(tmp_path / "images" / "c_0000.png")
    label = np.zeros((height, width), np.uint8)
    label[height // 4: height // 2, width // 4: width // 2] = 1
    Image.fromarray(label).save(tmp_path / "pred" / "c.png")
    Image.fromarray(np.roll(label, 3, axis=0)).save(tmp_path / "ref" / "c.png")
    [written] = write_overlays(tmp_path / "images", tmp_path / "pred", tmp_path / "out", tmp_path / "ref")
    with Image.open(written) as picture:
        factor = max(1, -(-MIN_PANEL_WIDTH // width))
        assert picture.width == width * factor and picture.width >= MIN_PANEL_WIDTH
        panel_height = height * factor
        assert panel_height / picture.height > 0.85, picture.size  # title and legend: the rest
