"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QuantshiftError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(QuantshiftError):
    """A configuration value or key is invalid."""


class DataError(QuantshiftError):
    """A data source is missing, unreadable or too small."""


class ModelError(QuantshiftError):
    """A model cannot be found or loaded."""


class NumericalError(QuantshiftError):
    """A computation met NaN/inf (calibration activations, solved weights) and cannot go on."""


class DependencyError(QuantshiftError):
    """A package a feature needs is missing, or installed but failing to import."""


class InvalidInput(ConfigError):
    """An option, recipe or study value rejected before any model loads or file is written."""

    def __init__(self, message: str) -> None:
        # one line, whatever the user typed: newlines in echoed values would split it
        super().__init__(" ".join(str(message).splitlines()))
