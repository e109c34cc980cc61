"""Training tests run tiny models: one intra-op thread is faster than two fighting over a busy 2-core CPU."""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses (CLI, torchrun) these tests start


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)
