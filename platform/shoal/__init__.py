"""Shoal: distributed data-parallel training for PyTorch from one YAML file."""

__version__ = "0.1.0"
