"""The study report: a document of blocks (document.py) built from the collected results
(records.StudyResults) by the sections (sections.py, frontier.py, task_types.py), rendered by
templates to report.md and to one self-contained report.html, plus results.json.

Everything in it comes from cached results, in a fixed order, with fixed float formats: rerunning
a finished study rewrites the same bytes. (Wall-clock times of a run go to timings.json, not into
the report.)
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from .analysis import multi_seed, source_analysis
from .document import Block, Heading, Image, to_html, to_markdown
from .figures import calibration_matrix_figure
from .records import StudyResults
from .sections import (
    cells_section,
    diagnostics_section,
    matrices_section,
    seeds_section,
    sensitivity_section,
    settings_section,
    single_seed_section,
    source_seed_section,
)


def build_blocks(collected: StudyResults, fig_dir: Path) -> list[Block]:
    """The whole document, section by section (sections.py; across models: frontier.py and
    task_types.py)."""
    from .frontier import configs_of, frontier_blocks
    from .task_types import task_type_blocks

    cells, units, seeds = collected["cells"], collected["units"], collected["spec"].calibration.seeds
    multi = multi_seed(collected)
    analyses = source_analysis(cells, units)
    b = settings_section(collected) + matrices_section(collected, analyses, multi)
    b.append(Heading(2, "Findings (computed)"))
    b += source_seed_section(analyses, seeds, fig_dir) if multi else single_seed_section(cells, units)
    b += sensitivity_section(cells, units, fig_dir)
    if calibration_matrix_figure(analyses, fig_dir / "calibration-matrix.png", multi):
        b.append(
            Image(
                "figures/calibration-matrix.png",
                "calibration x test values, coloured by the distance from each "
                "column's best calibration"
                + (
                    "; hatched = not significantly different from the best"
                    if multi
                    else " (single seed: not tested against seed noise)"
                ),
            )
        )
    b += seeds_section(cells, units, seeds)
    configured = configs_of(cells, units)  # sizes and per-item tables, computed once for both sections
    b += frontier_blocks(collected, fig_dir, configured)
    # per task type (instruction-tuned evaluation: iso-size, methods, difficulty, chat template)
    configs = configured[0]
    b += task_type_blocks(configs, cells, units, any(c.calib for c in configs))
    return b + diagnostics_section(collected) + cells_section(cells)


def results_json(collected: StudyResults) -> dict:
    from .frontier import packed_bytes

    return {
        "study": collected["spec"].name,
        "versions": collected["versions"],
        "cells": [
            {
                **{
                    k: c[k]
                    for k in (
                        "label",
                        "model",
                        "method",
                        "wbits",
                        "recipe",
                        "calib",
                        "key",
                        "status",
                        "metrics",
                        "calib_manifest",
                        "numerics",
                        "error",
                    )
                },
                "packed_bytes": packed_bytes(c),
            }
            for c in collected["cells"]
        ],
        "diagnostics": {
            m: [{"calib": k[0], "seed": k[1], "test": k[2], **v} for k, v in sorted(pairs.items())]
            for m, pairs in sorted(collected["diagnostics"].items())
        },
    }


def write_report(out_dir: Path, collected: StudyResults, cache_root: Path | None = None) -> Path:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(collected, fig_dir)
    md = to_markdown(blocks)
    write_text_atomic(out_dir / "report.md", md)
    write_text_atomic(out_dir / "report.html", to_html(blocks, out_dir, f"quantshift study {collected['spec'].name}"))
    write_json_atomic(out_dir / "results.json", results_json(collected))
    return out_dir / "report.md"
