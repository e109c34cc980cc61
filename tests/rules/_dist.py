"""A one-rank gloo process group for the distributed-wrapper rule tests (DDP, FSDP1, fully_shard on the CPU)."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def process_group(tmp_path):
    """One gloo rank, torn down after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
