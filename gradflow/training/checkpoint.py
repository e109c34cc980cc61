"""Atomic checkpoints: Trainer writes each one into a staging directory, which is renamed into place when whole.

A kill mid-save leaves only a `.staging-N` directory, never a partial `checkpoint-N`; `--resume` picks the last
checkpoint that carries the completion marker, and clears stale staging directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil

MARKER = "gradflow_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories under `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(run_dir: str) -> str | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def clear_staging(run_dir: str) -> None:
    """Remove what a killed save left behind: staging directories and unmarked checkpoints."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(".staging-") or (_CHECKPOINT.match(name) and not os.path.isfile(os.path.join(path, MARKER))):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def publish(staged: str, final: str, step: int) -> None:
    """Mark `staged` complete and rename it to `final` in one step."""
    files = sorted(os.path.relpath(os.path.join(r, f), staged) for r, _, fs in os.walk(staged) for f in fs)
    with open(os.path.join(staged, MARKER), "w") as fh:
        json.dump({"step": step, "files": files}, fh, indent=2)
    _fsync_tree(staged)
    if os.path.isdir(final):  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(final))


def rotate(run_dir: str, keep: int | None) -> None:
    if not keep or keep < 1:
        return
    for path in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def atomic_save_mixin(trainer_cls):
    """A Trainer subclass whose checkpoints are written atomically."""

    class AtomicCheckpointTrainer(trainer_cls):
        _gradflow_staging = None

        def _get_output_dir(self, trial):
            if self._gradflow_staging is not None:
                return self._gradflow_staging
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = super()._get_output_dir(trial)
            step = self.state.global_step
            staging = os.path.join(run_dir, f".staging-{step}")
            if self.args.should_save and os.path.isdir(staging):
                shutil.rmtree(staging)
            self.accelerator.wait_for_everyone()
            self._gradflow_staging = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._gradflow_staging = None
            # every rank has written its RNG state into the staging directory before it is published
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                publish(os.path.join(staging, f"checkpoint-{step}"), os.path.join(run_dir, f"checkpoint-{step}"), step)
                shutil.rmtree(staging, ignore_errors=True)
                rotate(run_dir, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    AtomicCheckpointTrainer.__name__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpointTrainer
