"""The commands' thread policy, in one place (the CLI and its sub-commands call it; library code
never changes torch's threads on its own)."""

from __future__ import annotations

import os


def use_all_cores() -> None:
    """Every core for torch's intra-op threads, unless OMP_NUM_THREADS says otherwise."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
