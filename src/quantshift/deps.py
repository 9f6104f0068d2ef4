"""Importing optional extras with messages that say what to install.

A missing optional package (ModuleNotFoundError naming that very package) becomes a
DependencyError saying what to install. Anything else, a package that is installed but fails to
import (a missing or broken dependency of it, a compiled extension built for another version),
becomes a DependencyError carrying the package's own message, chained to the original error, so a
broken install is never mistaken for an absent one. Required dependencies (pyproject
`dependencies`) are imported plainly, never through here: their failures must surface as they are.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DependencyError


def is_not_installed(err: ImportError, module: str) -> bool:
    """True when `err` says `module` itself (or its top-level package) is absent, not something
    it imports."""
    if not isinstance(err, ModuleNotFoundError) or err.name is None:
        return False
    return module == err.name or module.startswith(err.name + ".")


def import_optional(module: str, install: str, feature: str) -> ModuleType:
    """Import optional package `module` for `feature`; `install`: the command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if is_not_installed(err, module):
            raise DependencyError(f"{feature} needs the {module!r} package: {install}") from None
        raise DependencyError(
            f"{module!r} is installed but cannot be imported ({type(err).__name__}: {err}); "
            f"{feature} needs it working: reinstall it ({install})"
        ) from err
