"""quantshift: post-training quantization of causal LMs and calibration-shift studies.

    from quantshift import quantize, evaluate, export, load, save, run_study

The verbs live in quantshift.api; the pipeline they drive (load, engine, save) in
quantshift.pipeline."""

from .api import QuantizationResult, evaluate, export, load, quantize, run_study, save  # noqa: E402
from .data.calibset import CalibSet  # noqa: E402
from .recipes import Recipe  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "CalibSet",
    "QuantizationResult",
    "Recipe",
    "__version__",
    "evaluate",
    "export",
    "load",
    "quantize",
    "run_study",
    "save",
]
