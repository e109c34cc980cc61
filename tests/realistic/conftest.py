"""Each realistic script runs as if in its own process, as a user's train.py does."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _own_process_env():
    # TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ (TRL 0.29's SFTConfig: bf16 by default),
    # and every later Accelerator reads it: without this, one SFT script puts every later script in bf16 autocast
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
