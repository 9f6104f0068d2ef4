"""The package version, in a module of its own so a low-level module can read it without importing
the package root (which imports the public API and everything under it)."""

__version__ = "0.1.0"
