"""LipNeXt: the model, its certificate, the manifold optimizer and the training worker."""

from lipnext.config import PRESETS, LipNeXtConfig, preset
from lipnext.model import LipNeXt, param_counts

__all__ = ["PRESETS", "LipNeXt", "LipNeXtConfig", "param_counts", "preset"]
