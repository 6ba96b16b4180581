"""How the project draws its matplotlib figures: in a style of its own, whatever a library set for the whole
process before (nnU-Net's progress plot sets seaborn's theme with font_scale=2.5 for every later figure of the
process that trained), and written atomically."""
import contextlib
from typing import Any, Iterator

from nndiffseg.files import write_atomically

# matplotlib's defaults, then these (points; at FIGURE_DPI a 7-inch-wide figure is 770 px)
FIGURE_STYLE = {
    "font.size": 10.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 10.0,
    "legend.fontsize": 9.0,
    "xtick.labelsize": 9.0,
    "ytick.labelsize": 9.0,
    "figure.facecolor": "white",
}
FIGURE_DPI = 110


@contextlib.contextmanager
def figure_style() -> Iterator[Any]:
    """``matplotlib.pyplot`` with matplotlib's default style plus FIGURE_STYLE, for the figures drawn inside the
    block; the process's own style (seaborn's, a user's) is back as it was afterwards."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with matplotlib.style.context("default"), matplotlib.rc_context(FIGURE_STYLE):
        yield plt


def save_figure(fig, file: str) -> None:
    """The figure as a PNG at FIGURE_DPI, written under a temporary name and renamed; the figure is closed."""
    import matplotlib.pyplot as plt
    try:
        write_atomically(str(file), lambda name: fig.savefig(name, dpi=FIGURE_DPI, format="png"))
    finally:
        plt.close(fig)
