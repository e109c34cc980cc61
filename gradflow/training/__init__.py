"""Training: `gradflow train` on transformers.Trainer, with GradFlowCallback watching gradients.

Imports are lazy so that `gradflow.data` can use the pure-Python /think validation without torch.
"""

from __future__ import annotations

__all__ = ["train", "merge", "load_adapter", "GradFlowCallback", "TrainOptions"]

_LAZY = {
    "train": ("gradflow.training.engine", "train"),
    "TrainOptions": ("gradflow.training.engine", "TrainOptions"),
    "merge": ("gradflow.training.merge", "merge"),
    "load_adapter": ("gradflow.training.merge", "load_adapter"),
    "GradFlowCallback": ("gradflow.training.callback", "GradFlowCallback"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradflow.training' has no attribute {name!r}")
