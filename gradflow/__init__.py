"""gradflow: find, explain and fix broken gradient flow in PyTorch / transformers / PEFT fine-tuning.

The public API is imported lazily, so `gradflow --help` and `gradflow explain` never import torch.
"""

from __future__ import annotations

from gradflow._lazy import lazy_getattr

__version__ = "0.1.0"

__all__ = ["inspect", "probe", "patch", "train", "Report", "Finding", "GradFlowCallback", "SetupOptions",
           "schema", "__version__"]

_LAZY = {
    "inspect": ("gradflow.entries", "inspect"),
    "probe": ("gradflow.entries", "probe"),
    "patch": ("gradflow.entries", "patch"),
    "train": ("gradflow.training", "train"),
    "Report": ("gradflow.report", "Report"),
    "Finding": ("gradflow.report", "Finding"),
    "GradFlowCallback": ("gradflow.training.callback", "GradFlowCallback"),
    "SetupOptions": ("gradflow.setup.options", "SetupOptions"),
    "schema": ("gradflow.report.schema", "schema"),
}


__getattr__ = lazy_getattr(__name__, _LAZY)
