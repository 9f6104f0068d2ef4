"""quantshift: post-training quantization of causal LMs and calibration-shift studies.

    from quantshift import quantize, evaluate, export, load, save, run_study

The verbs live in quantshift.api. They are imported here eagerly: `quantize` also names the
submodule quantshift.quantize, and the package attribute must be the verb, which a later first
import of that submodule would overwrite (its full-name imports keep working)."""

__version__ = "0.1.0"

from .api import QuantizationResult, evaluate, export, load, quantize, run_study, save  # noqa: E402
from .data.calibset import CalibSet  # noqa: E402
from .recipes import Recipe  # noqa: E402

__all__ = ["CalibSet", "QuantizationResult", "Recipe", "__version__", "evaluate", "export", "load", "quantize",
           "run_study", "save"]
