"""gradflow: find, explain and fix broken gradient flow in PyTorch / transformers / PEFT fine-tuning.

The public API is imported lazily, so `gradflow --help` and `gradflow explain` never import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["inspect", "probe", "patch", "train", "Report", "Finding", "GradFlowCallback", "__version__"]

_LAZY = {
    "inspect": ("gradflow.api", "inspect"),
    "probe": ("gradflow.api", "probe"),
    "patch": ("gradflow.api", "patch"),
    "train": ("gradflow.training", "train"),
    "Report": ("gradflow.report", "Report"),
    "Finding": ("gradflow.report", "Finding"),
    "GradFlowCallback": ("gradflow.training.callback", "GradFlowCallback"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradflow' has no attribute {name!r}")
