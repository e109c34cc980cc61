"""Progress on stderr: a rich bar with ETA and tokens/s on a terminal, one line per log step otherwise."""

from __future__ import annotations

import time

from transformers import TrainerCallback


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RichProgress(TrainerCallback):
    """Steps, loss, tokens/s and ETA. Never shows sample text."""

    def __init__(self, console, tokens):
        self.console = console
        self.tokens = tokens  # callable: tokens seen so far (non-padding)
        self._progress = None
        self._task = None
        self._t0 = None
        self._tok0 = 0
        self._step0 = 0
        self.loss = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._t0, self._tok0, self._step0 = time.perf_counter(), self.tokens(), state.global_step
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                                 info="")

    def _rate(self, state):
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        done = state.global_step - self._step0
        tok_s = (self.tokens() - self._tok0) / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else 0.0
        return tok_s, eta

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            tok_s, _ = self._rate(state)
            loss = f"loss {self.loss:.4f}  " if self.loss is not None else ""
            self._progress.update(self._task, completed=state.global_step, info=f"{loss}{tok_s:,.0f} tok/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.loss = float(logs["loss"])
        if self._progress is None:
            tok_s, eta = self._rate(state)
            lr = logs.get("learning_rate")
            lr_text = f"  lr {lr:.2e}" if isinstance(lr, (int, float)) else ""
            self.console.print(f"step {state.global_step}/{state.max_steps}  loss {self.loss:.4f}{lr_text}  "
                               f"{tok_s:,.0f} tok/s  ETA {_eta(eta)}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
