"""Atomic, self-checking checkpoints: Trainer writes each one into a staging directory, which is renamed into place
when whole, with a manifest of what it holds.

A kill mid-save leaves only a `.staging-N` directory, never a partial `checkpoint-N`. The marker file
(`gradflow_checkpoint.json`) is the manifest: every file's size and SHA-256, the step, the run's max steps, and the
run's fingerprint (gradflow.training.resume). `--resume` takes the newest checkpoint whose files still match it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import re
import shutil

from gradflow.errors import GradflowError
from gradflow.files import fsync_dir
from gradflow.noise import refusing_pickles

MARKER = "gradflow_checkpoint.json"
MANIFEST_VERSION = 2  # 1: {"step", "files"} only, before manifests
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what Trainer.train(resume_from_checkpoint=...) reads besides the weights; without them it resumes silently with a
# fresh optimizer, a restarted schedule or new RNG streams
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
            "model.safetensors.index.json", "pytorch_model.bin.index.json")


def complete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories under `run_dir` that carry the completion marker, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def clear_staging(run_dir: str) -> None:
    """Remove what a killed save left behind: staging directories and unmarked checkpoints."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(".staging-") or (_CHECKPOINT.match(name) and not os.path.isfile(os.path.join(path, MARKER))):
            shutil.rmtree(path, ignore_errors=True)


# ----- the manifest -----------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs if f != MARKER)


def manifest(path: str, step: int, max_steps: int | None = None, fingerprint: dict | None = None) -> dict:
    """What `path` holds now: each file's size and SHA-256, with the step, max steps and the run's fingerprint."""
    files = _files(path)
    return {"version": MANIFEST_VERSION, "step": step, "max_steps": max_steps, "files": files,
            "manifest": {name: {"bytes": os.path.getsize(os.path.join(path, name)),
                                "sha256": sha256_file(os.path.join(path, name))} for name in files},
            "fingerprint": fingerprint}


def read_marker(path: str) -> dict | None:
    """The checkpoint's marker as a dict, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, MARKER)) as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def damage(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (truncated, missing or changed files), or None if intact."""
    marker = read_marker(path)
    if marker is None or not isinstance(marker.get("step"), int):
        return f"its {MARKER} is unreadable"
    listed = marker.get("manifest")
    if isinstance(listed, dict):
        for name, entry in sorted(listed.items()):
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                return f"{name} is missing"
            size = os.path.getsize(full)
            if size != entry.get("bytes"):
                return f"{name} is {size} bytes, {entry.get('bytes')} when saved"
            if sha256_file(full) != entry.get("sha256"):
                return f"{name} has changed since it was saved (SHA-256 differs)"
    names = set(os.listdir(path))
    # FSDP (--fsdp) checkpoints are sharded: optimizer_0/ and pytorch_model_fsdp_0/ (torch.distributed.checkpoint)
    sharded = any(n.startswith("pytorch_model_fsdp_") for n in names) and any(n.startswith("optimizer_") for n in names)
    for name in _REQUIRED:
        if not os.path.isfile(os.path.join(path, name)) and not (sharded and name == "optimizer.pt"):
            return f"{name} is missing"
    if not names & set(_WEIGHTS) and not sharded:
        return "it holds no model weights"
    if not any(n.startswith("rng_state") for n in names):
        return "its RNG state (rng_state*.pth) is missing"
    try:
        with open(os.path.join(path, "trainer_state.json")) as fh:
            step = json.load(fh).get("global_step")
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is unreadable"
    if step != marker["step"]:
        return f"trainer_state.json says step {step}, the marker {marker['step']}"
    if not isinstance(listed, dict):  # a marker from before manifests: at least the weights must parse
        return _unreadable_safetensors(path, names)
    return None


def _unreadable_safetensors(path: str, names: set[str]) -> str | None:
    from safetensors import safe_open

    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # SafetensorError and OSError alike: the file is what is wrong
            return f"{name} is unreadable ({type(exc).__name__})"
    return None


@dataclasses.dataclass
class Intact:
    """The checkpoint --resume continues from, and the newer ones it passed over as damaged."""

    path: str
    step: int
    max_steps: int | None
    fingerprint: dict | None  # None: written before fingerprints
    damaged: list[tuple[str, str]]  # (path, why), newest first


def newest_intact(run_dir: str) -> tuple[Intact | None, list[tuple[str, str]]]:
    """The newest complete checkpoint whose files match its manifest, and the damaged ones newer than it."""
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        why = damage(path)
        if why is not None:
            damaged.append((path, why))
            continue
        marker = read_marker(path)
        max_steps = marker.get("max_steps")
        if max_steps is None:  # before manifests: Trainer's own state has it
            with open(os.path.join(path, "trainer_state.json")) as fh:
                max_steps = json.load(fh).get("max_steps")
        return Intact(path, marker["step"], max_steps, marker.get("fingerprint"), damaged), damaged
    return None, damaged


def set_aside(path: str) -> str:
    """Move a damaged checkpoint out of the way (`checkpoint-N.damaged`): kept to inspect, never resumed or rotated."""
    target = f"{path}.damaged"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged-{n}"
    os.replace(path, target)
    return target


# ----- writing ----------------------------------------------------------------------------------------------
def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def publish(staged: str, final: str, step: int, max_steps: int | None = None, fingerprint: dict | None = None) -> None:
    """Write the manifest into `staged` and rename it to `final` in one step."""
    with open(os.path.join(staged, MARKER), "w") as fh:
        json.dump(manifest(staged, step, max_steps, fingerprint), fh, indent=2)
    _fsync_tree(staged)
    if os.path.isdir(final):  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(os.path.dirname(final))


def rotate(run_dir: str, keep: int | None) -> None:
    if not keep or keep < 1:
        return
    for path in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# how a failed write reads once torch, safetensors or the C++ stream writer has wrapped it
_WRITE_FAILED = ("No space left", "File too large", "Disk quota", "iostream error", "unexpected pos",
                 "failed writing file")


@contextlib.contextmanager
def writing(what: str, run_dir: str):
    """A write that fails while saving `what` (a full device, a quota or a file-size limit) as one line that names the
    last intact checkpoint. Nothing half-written is marked intact: a checkpoint is published only when whole."""
    try:
        yield
    except GradflowError:
        raise
    except Exception as exc:
        failed = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
            text in str(exc) for text in _WRITE_FAILED)
        if not failed:
            raise
        done = complete_checkpoints(run_dir)
        then = (f"run again with --resume (the last intact checkpoint is {os.path.basename(done[-1])})" if done
                else "run again with --overwrite (no checkpoint was complete yet)")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise GradflowError(f"could not write {what} ({first}): the device is full, or a quota or file-size limit "
                            "was reached", f"Free space, then {then}") from exc


@contextlib.contextmanager
def plain_tensors(checkpoint: str | None):
    """Resuming from `checkpoint`: a file in it that torch will not load as plain tensors (a pickled object, which
    gradflow never writes, and its manifest cannot vouch for) is one line, not an internal error. Nothing in it runs:
    torch's weights-only loader refused it."""
    if checkpoint is None:  # nothing to resume: nothing of the user's is unpickled
        yield
        return
    try:
        with refusing_pickles():
            yield
    except pickle.UnpicklingError as exc:
        raise GradflowError(f"--resume: {checkpoint} holds a file that is not plain tensors (torch refused to unpickle "
                            "it); a checkpoint gradflow writes never does", "Set that checkpoint aside to resume "
                            "from the one before, or pass --overwrite to train again") from exc


def atomic_save_mixin(trainer_cls):
    """A Trainer subclass whose checkpoints are written atomically, each with its manifest.

    Set `trainer.gradflow_fingerprint` (a dict) to record the run's fingerprint in every checkpoint.
    """

    class AtomicCheckpointTrainer(trainer_cls):
        _gradflow_staging = None
        gradflow_fingerprint = None

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
                with writing(f"checkpoint-{step} in {run_dir}", run_dir):
                    super()._save_checkpoint(model, trial)
            finally:
                self._gradflow_staging = None
            # every rank has written its RNG state into the staging directory before it is published
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                with writing(f"checkpoint-{step} in {run_dir}", run_dir):
                    publish(os.path.join(staging, f"checkpoint-{step}"), os.path.join(run_dir, f"checkpoint-{step}"),
                            step, self.state.max_steps, self.gradflow_fingerprint)
                shutil.rmtree(staging, ignore_errors=True)
                rotate(run_dir, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()

    AtomicCheckpointTrainer.__name__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpointTrainer
