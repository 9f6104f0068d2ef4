"""Matplotlib setup and figure saving shared by the report's sections (report.py, frontier.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

CAPTION_RECT = (0, 0.06, 1, 1)  # the figure area above the caption line
# where a label may go around its point: (dx, dy) in points and the text's alignment there
LABEL_SLOTS = [
    (3, 3, "left", "bottom"),
    (3, -3, "left", "top"),
    (-3, 3, "right", "bottom"),
    (-3, -3, "right", "top"),
    (0, 6, "center", "bottom"),
    (0, -6, "center", "top"),
    (8, 0, "left", "center"),
    (-8, 0, "right", "center"),
    (6, 12, "left", "bottom"),
    (6, -12, "left", "top"),
    (-6, 12, "right", "bottom"),
    (-6, -12, "right", "top"),
    (0, 18, "center", "bottom"),
    (0, -18, "center", "top"),
]


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path, caption: str) -> None:
    """Caption under the plot (what the whiskers/hatching mean), fixed metadata: same bytes on rerun."""
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=CAPTION_RECT)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    fig.clf()
    pyplot().close(fig)


def place_labels(ax: Axes, points: Sequence[tuple[float, float, str]], fontsize: float = 6) -> list[str]:
    """Label points so that no label overlaps another label, a marker or the axes' edge: each label
    takes the first free slot of LABEL_SLOTS around its point. Returns the labels no slot could
    hold (the caller names them elsewhere, e.g. in the caption). Lays the figure out first (as
    save_figure will), so the positions checked are the saved ones."""
    fig = cast("Figure", ax.figure)  # a pyplot figure's axes: no subfigures here
    fig.tight_layout(rect=CAPTION_RECT)
    renderer = cast("FigureCanvasAgg", fig.canvas).get_renderer()  # pyplot() draws with Agg
    frame = ax.get_window_extent(renderer)
    xy: Iterable[Sequence[float]] = ax.transData.transform([(x, y) for x, y, _ in points]) if points else []
    markers = [(px - 3, py - 3, px + 3, py + 3) for px, py in xy]
    taken: list[tuple[float, float, float, float]] = []
    legend = ax.get_legend()
    if legend is not None:
        lb = legend.get_window_extent(renderer)
        taken.append((lb.x0, lb.y0, lb.x1, lb.y1))
    missing = []
    for i, (x, y, label) in enumerate(points):
        others = markers[:i] + markers[i + 1 :]
        for dx, dy, ha, va in LABEL_SLOTS:
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha, va=va)
            t.set_in_layout(False)  # placed for this layout: a later tight_layout must not move the axes for it
            bb = t.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            if inside and not any(_overlap(box, o) for o in taken + others):
                taken.append(box)
                break
            t.remove()
        else:
            missing.append(label)
    return missing


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
