"""Matplotlib setup and figure saving shared by the report's sections (report.py, frontier.py)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, caption: str) -> None:
    """Caption under the plot (what the whiskers/hatching mean), fixed metadata: same bytes on rerun."""
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90, metadata={"Software": None})
    fig.clf()
    pyplot().close(fig)
