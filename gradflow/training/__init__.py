"""Training: `gradflow train` on transformers.Trainer, with GradFlowCallback watching gradients.

Imports are lazy so that `gradflow.data.jsonl` can use the pure-Python /think validation without torch.
"""

from __future__ import annotations

from gradflow._lazy import lazy_getattr

__all__ = ["train", "merge", "load_adapter", "GradFlowCallback", "TrainOptions"]

_LAZY = {
    "train": ("gradflow.training.engine", "train"),
    "TrainOptions": ("gradflow.training.options", "TrainOptions"),
    "merge": ("gradflow.training.merge", "merge"),
    "load_adapter": ("gradflow.setup.so8", "load_adapter"),
    "GradFlowCallback": ("gradflow.training.callback", "GradFlowCallback"),
}


__getattr__ = lazy_getattr(__name__, _LAZY)
