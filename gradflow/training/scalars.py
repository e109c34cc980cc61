"""GradFlowCallback's TensorBoard scalars: loss, lr and grad norm from the Trainer's logs, per-layer grad norms."""

from __future__ import annotations

import math
import sys


def open_writer(directory: str):
    """A SummaryWriter on `directory`, or None (with a line on stderr) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=directory)
    except ImportError:
        sys.stderr.write("gradflow: tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)\n")
        return None


def write_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """Every finite number in `values` as `prefix/key` at `step`."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
