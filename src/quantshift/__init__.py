"""quantshift: post-training quantization of causal LMs and calibration-shift studies."""

__version__ = "0.1.0"
