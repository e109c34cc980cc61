"""Distributed pieces: a free local port, the torchrun command line, and a one-rank gloo process group."""

from __future__ import annotations

import socket
import sys

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's --master-port or a forked rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --nproc-per-node N --master-port <free> ARGS` as an argv list."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), *map(str, args)]


@pytest.fixture
def process_group(tmp_path):
    """One gloo rank, torn down after the test (the distributed-wrapper rule tests: DDP, FSDP1, fully_shard)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
