"""Unlearning: methods (each one its loss) on one shared, accelerate-ready loop."""

from unpact.unlearn.config import LoraSettings, UnlearnConfig, resolve_config
from unpact.unlearn.loop import UnlearnResult, unlearn
from unpact.unlearn.methods import METHODS, Batch, Method, StepContext, get_method

__all__ = [
    "METHODS",
    "Batch",
    "LoraSettings",
    "Method",
    "StepContext",
    "UnlearnConfig",
    "UnlearnResult",
    "get_method",
    "resolve_config",
    "unlearn",
]
