"""The process group's lifecycle under torchrun, in one place: start it, ask whether there is more than one process,
bind each rank to its GPU, keep the other ranks quiet on stdout, agree on a value, and tear it down.

torch is imported inside the functions: a command that never runs distributed never imports torch.distributed.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys

from gradflow.stdio import silence_stdout
from gradflow.errors import GradflowError

WRAPPERS = ("ddp", "fsdp")


@dataclasses.dataclass
class Launch:
    wrapper: str  # ddp | fsdp
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str  # cpu | cuda:N
    wrapped: object = None  # a DistributedDataParallel the factory returned (its module is the setup's model)


def start(wrapper: str, *, refused: dict | None = None) -> Launch:
    """Check torchrun's environment and initialise the process group (once). `refused`: flag -> value set."""
    if wrapper not in WRAPPERS:
        raise GradflowError(f"unknown wrapper {wrapper!r}", "Pass --ddp or --fsdp")
    flag = f"--{wrapper}"
    bad = [name for name, value in (refused or {}).items() if value]
    if bad:
        raise GradflowError(f"{flag} cannot be combined with {', '.join(bad)} yet",
                            f"Drop {', '.join(bad)}, or probe in one process without {flag}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise GradflowError(f"{flag} needs the process group that torchrun sets up (RANK / WORLD_SIZE are unset)",
                            f"Launch it as: torchrun --nproc-per-node 2 -m gradflow probe-backward MODEL {flag}")
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU, for --device auto as well
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(finish)
    if rank != 0:  # rank 0 speaks for the run: the others print nothing on stdout
        silence_stdout()
    return Launch(wrapper, rank, world, local, backend, device)


def end() -> None:
    """The end of a command that completed under torchrun: every rank waits for the others (rank 0 may still be
    writing its report), then the process group is torn down while the interpreter is whole. Left to exit, a rank
    that finished first could be aborted by gloo's still-joinable threads in interpreter shutdown ("terminate
    called without an active exception": rank 1 of a `probe-backward --fsdp`, once in CI). Not for error paths:
    a rank that failed may never reach the barrier (atexit's `finish` tears down without waiting)."""
    import sys

    if "torch.distributed" not in sys.modules:  # a command refused before torch was imported
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # tearing down after an error on another rank: nothing left to save
            pass


def bind_local_gpu() -> None:
    """Under torchrun with CUDA: make "cuda" mean this rank's GPU (LOCAL_RANK) before the model is built, so that
    each rank builds, plans and probes on its own GPU instead of all on cuda:0. No-op in one process or on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def train_world(device_type: str = "cpu") -> tuple[int, str] | None:
    """(world size, backend) under torchrun / accelerate launch with more than one process, else None.

    The pre-flight runs before Trainer exists, so the default process group may not be up yet: it is started here
    through accelerate's PartialState, exactly as TrainingArguments starts it later (same backend: gloo on CPU,
    nccl on CUDA; Trainer then finds the group initialised and uses it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=device_type == "cpu")
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    return dist.get_world_size(), str(dist.get_backend())


def agree_min(value: int | None) -> int | None:
    """The smallest `value` any rank holds (None: none holds one); the value itself in one process. A collective
    under torchrun: every rank must call it at the same point."""
    import torch.distributed as dist

    if not is_multi_process():
        return value
    import torch

    none = 2 ** 62
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    t = torch.tensor([none if value is None else int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    out = int(t.item())
    return None if out == none else out


def is_multi_process() -> bool:
    """A process group with more than one process is up (torchrun, accelerate launch, or a Trainer's own)."""
    if "torch.distributed" not in sys.modules:  # nothing here imported it, so nothing started a group
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
