"""SIGINT and SIGTERM during training: stop at the next step boundary with a complete checkpoint.

The handlers are installed only around `trainer.train()`. The first signal sets a flag; at the end of the step
in progress the callback asks Trainer to save a checkpoint (through the atomic checkpoint code) and stop. A
second signal aborts at once (SystemExit 128+N); the last complete checkpoint is still there to resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from transformers import TrainerCallback

from gradflow.world import is_multi_process

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by signal N, 128 + N: ExitCode.INTERRUPTED / TERMINATED."""
    return 128 + signum


class StopOnSignal(TrainerCallback):
    """Turns a SIGINT / SIGTERM received while `installed()` into a checkpoint and a clean stop."""

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self.stopped_at: int | None = None  # the step after which it stopped the run
        self._previous: dict = {}  # signal number → the handler install() replaced

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    def on_step_end(self, args, state, control, **kwargs):
        received = _agreed(self.received or 0)
        if received and self.stopped_at is None:
            self.received = self.received or received  # a rank that got none stops with the others
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            os.write(2, f"gradflow: {name}: stopping after this step to save a checkpoint (again to abort "
                        f"now)\n".encode())
            return
        again = "again" if signum == self.received else f"after {self.name}"
        os.write(2, f"gradflow: {name} {again}: aborted at once; the last complete checkpoint stays\n".encode())
        raise SystemExit(exit_code(signum))

    def install(self) -> None:
        """SIGINT / SIGTERM handlers from now until `restore()`. A signal the process ignores (a background job's
        SIGINT) stays ignored; off the main thread Python cannot install any."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            old = signal.getsignal(signum)
            if old is not signal.SIG_IGN and signum not in self._previous:
                self._previous[signum] = old
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        """The handlers from before `install()` (idempotent)."""
        while self._previous:
            signum, old = self._previous.popitem()
            signal.signal(signum, old if old is not None else signal.SIG_DFL)

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the block, the previous ones after it."""
        self.install()
        try:
            yield self
        finally:
            self.restore()


def _agreed(received: int) -> int:
    """Under DDP every rank stops at the same step: the largest signal number any rank received (0 for none)."""
    import torch.distributed as dist

    if not is_multi_process():
        return received
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([received], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())  # one small collective per optimizer step
