"""Run folder layout and model files; the only package that spells checkpoint paths."""
from beit_scale.checkpoint.layout import RunLayout

__all__ = ["RunLayout"]
