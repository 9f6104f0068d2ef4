"""TaskDef: what quantshift knows of one of its own tasks (tasks.py registers them; localdata.py and
offline.py define them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskDef:
    name: str
    description: str
    category: str
    # data_dir -> items: {"id", "query", "choices", "gold"} (multiple choice) or
    # {"id", "query", "answers"} (generation); optional "group" (split unit), "split" ("train"/"test")
    load_items: Callable[[Path | None], list[dict]]
    kind: str = "mc"  # "mc": log-likelihood of each choice; "gen": greedy generation, exact match / F1
    language: str = "en"
    needs: str = ""  # "", "download" (fetched once into the cache), "data-dir"
    preamble: str = ""  # lm-eval `description`: printed once before the few-shot exemplars
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    test_frac: float = 0.5  # share of groups scored when the data has no split of its own
    default_shots: int | None = None  # fixed shot count (BOSS); None: the caller's --shots
    until: tuple[str, ...] = ("\n",)  # generation stop strings
    max_gen_toks: int = 32
    source_note: str = ""
    # items carved (seed 42) out of the scored split to serve as calibration text, for datasets
    # with no training split of their own (BOSS OOD sets, CMMLU: 300 in Liu et al.); at most half
    # of a small test split is carved, so something is left to score; 0 = calibrate on the pool
    calib_from_test: int = 0
