"""GradFlowCallback: a transformers TrainerCallback that watches gradient flow while a run trains.

Usable in anyone's own Trainer:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[gradflow.GradFlowCallback(check_every=10, moved_at_step=5)])

Every `check_every` optimizer steps (and at the first) it checks that every trainable parameter got a finite
gradient and records per-layer gradient norms. At step `moved_at_step` it checks that the trainable weights
actually moved. A broken state sets `control.should_training_stop`, prints one line on stderr and lands in
`callback.findings`, so the run stops now rather than hours later.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Callable

import torch
from transformers import TrainerCallback

from gradflow.training.findings import finding

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.\d+)(?:\.|$)")
_PEFT_PREFIX = re.compile(r"^(?:module\.)?(?:base_model\.model\.)?(?:model\.)?")
_SAMPLE = 1024  # elements kept per parameter to tell whether it moved


def layer_key(name: str) -> str:
    """Group a parameter name into its layer: 'layers.3', 'h.0', or the top-level module ('lm_head')."""
    bare = _PEFT_PREFIX.sub("", name)
    match = _LAYER.match(bare)
    if match:
        return ".".join(match.group(1).split(".")[-2:])
    return bare.split(".")[0] if "." in bare else bare


def _unwrap(model):
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module  # DDP / accelerate wrappers
    return model


class GradFlowCallback(TrainerCallback):
    """Checks gradients and weight movement during training; stops the run on a broken state.

    Args:
        check_every: check gradients every N optimizer steps (and at the first).
        moved_at_step: at this optimizer step, check that every trainable parameter has changed.
        stop_on_error: set `control.should_training_stop` when an error finding appears.
        tensorboard_dir: when set (and tensorboard is installed), write loss, lr, grad norm and per-layer
            gradient norms there as scalars.
        on_finding: called with each Finding as it appears (the default prints one line on stderr).
        diagnose: on missing gradients, run `gradflow.probe` on the last batch to name the cause.

    Attributes:
        findings: the Findings raised so far.
        history: one `{"step": int, "layers": {layer: norm}, "missing": int, "nonfinite": int}` per check.
        stopped_at: the step at which it stopped the run, or None.
    """

    def __init__(self, check_every: int = 10, moved_at_step: int | None = 5, *, stop_on_error: bool = True,
                 tensorboard_dir: str | None = None, on_finding: Callable | None = None, diagnose: bool = True):
        if check_every < 1:
            raise ValueError("check_every must be at least 1")
        self.check_every = check_every
        self.moved_at_step = moved_at_step
        self.stop_on_error = stop_on_error
        self.tensorboard_dir = tensorboard_dir
        self.on_finding = on_finding
        self.diagnose = diagnose
        self.findings = []
        self.history: list[dict] = []
        self.stopped_at: int | None = None
        self.moved_checked = False
        self.last_layers: dict[str, float] = {}
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._start: list[torch.Tensor] = []
        self._groups: list[str] = []
        self._group_index: torch.Tensor | None = None
        self._min_supervised: torch.Tensor | None = None
        self._empty_seen = False
        self._last_batch = None
        self._hook = None
        self._writer = None
        self._main = True
        self._fp16_nonfinite_streak = 0
        self._pre_optimizer_seen = False
        self._model = None
        self._step = 0

    # ----- set-up --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._main = bool(getattr(state, "is_world_process_zero", True))
        self._model = _unwrap(model) if model is not None else None
        if self._model is None:
            return
        self._params = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        self._start = [self._sample(p) for _, p in self._params]
        keys = [layer_key(n) for n, _ in self._params]
        self._groups = list(dict.fromkeys(keys))
        where = {g: i for i, g in enumerate(self._groups)}
        device = self._params[0][1].device if self._params else torch.device("cpu")
        self._group_index = torch.tensor([where[k] for k in keys], dtype=torch.long, device=device)
        if self._hook is None:
            self._hook = self._model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        if self.tensorboard_dir and self._main and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.tensorboard_dir)
            except ImportError:
                sys.stderr.write("gradflow: tensorboard is not installed; no TensorBoard scalars "
                                 "(pip install tensorboard)\n")
        if not self._params:
            self._raise(control, state, finding("no-trainable-parameters",
                                                "nothing requires grad when training begins"))

    @staticmethod
    def _sample(p: torch.Tensor) -> torch.Tensor:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLE)
        return flat[::stride][:_SAMPLE].clone()

    def _see_batch(self, _module, args, kwargs):
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and torch.is_grad_enabled():
            self._last_batch = (args, kwargs)
            shifted = labels[..., 1:] if labels.dim() > 1 and labels.shape[-1] > 1 else labels
            count = shifted.ne(-100).sum()
            # kept on the device: read back only at check steps (.item() here would sync every forward)
            self._min_supervised = count if self._min_supervised is None else torch.minimum(self._min_supervised, count)
        return None

    # ----- the checks ----------------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # grads are complete (accumulated, clipped) and not yet zeroed here
        self._pre_optimizer_seen = True
        step = self._step = state.global_step + 1
        if step == 1 or step % self.check_every == 0:
            self._check_grads(step, args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        step = self._step = state.global_step
        if not self._pre_optimizer_seen and (step == 1 or step % self.check_every == 0):
            # older transformers: no pre-optimizer event; grads may be zeroed by now, so only finite checks count
            if any(p.grad is not None for _, p in self._params):
                self._check_grads(step, args, state, control)
        if step == 1 or step % self.check_every == 0:
            self._check_supervised(step, state, control)
        if self.moved_at_step is not None and step == self.moved_at_step:
            self._check_moved(step, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_batch = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._writer is None or not logs:
            return
        for key in ("loss", "learning_rate", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"train/{key}", value, state.global_step)

    def _check_grads(self, step, args, state, control):
        if not self._params:
            return
        missing = [n for n, p in self._params if p.grad is None]
        present = [(n, p.grad) for n, p in self._params if p.grad is not None]
        layers: dict[str, float] = {}
        nonfinite: list[str] = []
        if present:
            device = self._group_index.device
            sq = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) ** 2
                              for _, g in present])
            idx = torch.tensor([i for i, (_, p) in enumerate(self._params) if p.grad is not None], device=device)
            per_group = torch.zeros(len(self._groups), device=device).index_add_(0, self._group_index[idx], sq)
            values = torch.cat([per_group, sq]).tolist()  # one device→host read for the whole check
            group_sq, param_sq = values[: len(self._groups)], values[len(self._groups):]
            layers = {g: math.sqrt(v) if math.isfinite(v) else float("nan")
                      for g, v in zip(self._groups, group_sq)}
            nonfinite = [n for (n, _), v in zip(present, param_sq) if not math.isfinite(v)]
        self.last_layers = layers
        self.history.append({"step": step, "layers": layers, "missing": len(missing), "nonfinite": len(nonfinite)})
        if self._writer is not None:
            for g, v in layers.items():
                if math.isfinite(v):
                    self._writer.add_scalar(f"grad_norm_layer/{g}", v, step)
        if missing:
            self._missing(step, missing, state, control)
        if nonfinite:
            self._fp16_nonfinite_streak += 1
            # with fp16 loss scaling an occasional overflow is normal (the scaler skips that step)
            if not getattr(args, "fp16", False) or self._fp16_nonfinite_streak >= 3:
                # Trainer's clip_grad_norm_ (transformers 5.x calls it even with clipping off, max_norm=inf)
                # multiplies every gradient by a NaN coefficient: the origin is then the probe's to find
                spread = " (every gradient: Trainer's norm clipping spreads one NaN to all of them)" \
                    if len(nonfinite) == len(present) > 1 else ""
                self._raise(control, state, finding(
                    "nonfinite-grad", f"step {step}: NaN/Inf gradient in {len(nonfinite)} trainable parameter(s), "
                                      f"first {nonfinite[0]}{spread}",
                    location=nonfinite[0].rsplit(".", 1)[0], params=nonfinite))
                self._diagnose(control, state)
        else:
            self._fp16_nonfinite_streak = 0

    def _missing(self, step, missing, state, control):
        message = (f"step {step}: {len(missing)} of {len(self._params)} trainable parameters got no gradient, "
                   f"first {missing[0]}")
        self._raise(control, state, finding("grad-missing-in-training", message,
                                            location=missing[0].rsplit(".", 1)[0], params=missing))
        self._diagnose(control, state)

    def _diagnose(self, control, state):
        if self.diagnose and self._last_batch is not None and self._model is not None:
            for f in self._probe_cause():
                self._raise(control, state, f)

    def _probe_cause(self):
        """The probe's error findings on the last batch: why the gradient stops."""
        try:
            from gradflow.api import probe

            args, kwargs = self._last_batch
            batch = dict(kwargs) if not args else None
            report = probe(self._model, batch) if batch is not None else None
            return [f for f in (report.findings if report else []) if f.severity == "error"]
        except Exception:  # a diagnosis that fails must not hide the finding it explains
            return []

    def _check_supervised(self, step, state, control):
        if self._min_supervised is None:
            return
        value = self._min_supervised.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop together, or the others hang in the next all-reduce
            value = value.to(self._group_index.device if self._group_index is not None else value.device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        self._min_supervised = None
        if int(value) == 0 and not self._empty_seen:
            self._empty_seen = True
            self._raise(control, state, finding(
                "no-supervised-tokens", f"by step {step}: a batch had no supervised token (every label -100); "
                                        "its loss is NaN or zero and teaches nothing"))

    def _check_moved(self, step, state, control):
        self.moved_checked = True
        still = [n for (n, p), start in zip(self._params, self._start)
                 if torch.equal(self._sample(p).to(start.device), start)]
        if still:
            self._raise(control, state, finding(
                "adapter-not-updated", f"step {step}: {len(still)} of {len(self._params)} trainable parameters "
                                       f"have not changed since training began, first {still[0]}",
                location=still[0].rsplit(".", 1)[0], params=still))

    def moved(self) -> dict[str, bool]:
        """Per trainable parameter: has it changed since training began?"""
        return {n: not torch.equal(self._sample(p).to(start.device), start)
                for (n, p), start in zip(self._params, self._start)}

    def _raise(self, control, state, f):
        if any(g.slug == f.slug and g.message == f.message for g in self.findings):
            return
        self.findings.append(f)
        if f.severity == "error" and self.stop_on_error:
            control.should_training_stop = True
            if self.stopped_at is None:
                self.stopped_at = self._step
        if not self._main:
            return
        if self.on_finding is not None:
            self.on_finding(f)
        else:
            sys.stderr.write(f"gradflow: {f.severity}: {f.code} {f.slug}: {f.message}"
                             f"{' — stopping the run' if f.severity == 'error' and self.stop_on_error else ''}\n")
