"""GradFlowCallback: a transformers TrainerCallback that checks gradient flow before and while a run trains.

Usable in anyone's own Trainer:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[gradflow.GradFlowCallback(check_every=10, moved_at_step=5)])

At `on_train_begin`, after the Trainer has set the run up (checkpointing from its args, the optimizer, the
dataloader) and before any step, it probes the first batch of the train dataloader with the run's own model and
optimizer (the pre-flight). Then every `check_every` optimizer steps (and at the first this process trains, a
resumed run's too) it checks that every trainable parameter got a finite gradient and records per-layer norms.
After every step it checks that the parameters trainable when the first step began still require grad
(`requires-grad-changed`: a `set_adapter` or `requires_grad_(False)` inside compute_loss; freezing in an
`on_train_begin` is the user's choice). At step `moved_at_step` it checks that the trainable weights that can
have moved by then actually moved. A broken state sets `control.should_training_stop` (or, with `raise_on_error`,
raises GradflowError), prints one line on stderr with its fix and lands in `callback.findings`, so the run stops
now rather than hours later.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

import torch
from transformers import TrainerCallback

from gradflow.api import inspect
from gradflow.errors import GradflowError
from gradflow.finding import with_hints
from gradflow.models import layer_key, unwrap
from gradflow.report.ranks import gather_findings
from gradflow.training.diagnose import probe_cause
from gradflow.training.findings import finding
from gradflow.training.flags import FlagWatch
from gradflow.training.norms import layer_norms
from gradflow.training.scalars import open_writer, write_scalars
from gradflow.training.moved import MovedCheck
from gradflow.setup.trainer_source import trainer_hints
from gradflow.training.preflight import trainer_preflight
from gradflow.world import agree_min


class GradFlowCallback(TrainerCallback):
    """Checks gradient flow before the first step and during training; stops the run on a broken state.

    Args:
        check_every: check gradients every N optimizer steps (and at the first).
        moved_at_step: at this optimizer step, check that every trainable parameter has changed; None skips
            the check. Only parameters that can have moved are judged: one side of a LoRA pair whose other side
            starts at zero (lora_A with PEFT's default init) gets a zero gradient at its first step, so it needs 2
            optimizer steps that update (warmup steps at lr 0, fp16 overflow skips do not count). Those not judged at
            this step are noted on stderr and judged at the first later step they can move, if the run gets there.
        preflight: at `on_train_begin`, before any step, run `gradflow.probe` on the first batch of the train
            dataloader with the run's own model and optimizer, and report its error and warning findings
            (reentrant checkpointing without input grads, a frozen adapter, parameters missing from the optimizer,
            ...). It costs about one training step. The model, the RNG streams and the dataloader order are left as
            found. The batch is drawn from a fresh iterator of the dataloader: with a one-shot iterable dataset,
            pass False.
        trainable: regex naming the parameters you intend to train; those that are frozen are reported as
            `intended-param-frozen` (by the pre-flight, or by a static check when `preflight=False`).
        raise_on_error: raise `gradflow.errors.GradflowError` (its `.findings` holds the error findings) from
            `trainer.train()` when an error finding appears, instead of only stopping the run: a pre-flight error
            then stops the run before its first step. Meant for CI.
        stop_on_error: set `control.should_training_stop` when an error finding appears. The Trainer reads it
            only after a step, so a pre-flight error still lets the first step run (and a loud break raise its own
            error there, after gradflow has printed the cause); `raise_on_error=True` stops before it.
        tensorboard_dir: when set (and tensorboard is installed), write loss, lr, grad norm and per-layer
            gradient norms there as scalars.
        on_finding: called with each error or warning Finding as it appears (the default prints one line on
            stderr, with the finding's fix).
        diagnose: on missing or non-finite gradients, run `gradflow.probe` on the last batch to name the cause.

    Attributes:
        findings: the error and warning Findings raised so far (the pre-flight's included).
        preflight_report: the pre-flight's Report (info findings such as `lora-zero-init` included), or None.
        history: one `{"step": int, "layers": {layer: norm}, "missing": int, "nonfinite": int}` per check.
        stopped_at: the step at which it stopped the run (0: the pre-flight, before the first step), or None.
        moved_not_judged: names of the trainable parameters the moved-weights check has not judged yet, because
            they could not have moved by `moved_at_step` (see above); empty once all are judged.
    """

    def __init__(self, check_every: int = 10, moved_at_step: int | None = 5, *, preflight: bool = True,
                 trainable: str | None = None, raise_on_error: bool = False, stop_on_error: bool = True,
                 tensorboard_dir: str | None = None, on_finding: Callable | None = None, diagnose: bool = True):
        if check_every < 1:
            raise ValueError("check_every must be at least 1")
        if trainable is not None:
            re.compile(trainable)  # a bad pattern fails here, not when training begins
        self.check_every = check_every
        self.moved_at_step = moved_at_step
        self.preflight = preflight
        self.trainable = trainable
        self.raise_on_error = raise_on_error
        self.stop_on_error = stop_on_error
        self.tensorboard_dir = tensorboard_dir
        self.on_finding = on_finding
        self.diagnose = diagnose
        self.findings = []
        self.preflight_report = None
        self.history: list[dict] = []
        self.stopped_at: int | None = None
        self.last_layers: dict[str, float] = {}
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._moves = MovedCheck()
        self._flags: FlagWatch | None = None
        self._warned: set[str] = set()  # parameters a pre-flight warning or error named (said once, there)
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
        self._optimizer_seen = False
        self._model = None
        self._step, self._first = 0, 1  # the step now; the first step this process trains (on_train_begin)
        self._pending: list = []  # error findings not yet raised (raise_on_error)
        self._hint: dict[str, str] = {}  # slug -> a fix for this Trainer's set-up, shown after the fix title

    # ----- set-up --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._main = bool(getattr(state, "is_world_process_zero", True))
        self._model = unwrap(model) if model is not None else None
        self._step = state.global_step  # 0, or the step a resumed run starts from
        self._first = state.global_step + 1  # a resumed run checks its own first step too
        if self._model is None:
            return
        self._hint = trainer_hints(args)
        if self.preflight:
            self._preflight(args, state, control, kwargs)
        elif self.trainable is not None:
            self._intended_frozen(control, state)
        self._watch(state)
        if self._hook is None:
            self._hook = self._model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        if self.tensorboard_dir and self._main and self._writer is None:
            self._writer = open_writer(self.tensorboard_dir)
        if not self._params and self.preflight_report is None:  # the pre-flight names a more specific cause
            self._raise(control, state, finding("no-trainable-parameters",
                                                "nothing requires grad when training begins"))
        self._raise_pending("before its first step" if self._step == 0 else f"before step {self._step + 1}")

    def _watch(self, state):
        """Watch the parameters trainable now: their gradients, whether they move, their requires_grad flags."""
        self._params = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        self._moves = MovedCheck(self._params, state.global_step)
        keys = [layer_key(n) for n, _ in self._params]
        self._groups = list(dict.fromkeys(keys))
        where = {g: i for i, g in enumerate(self._groups)}
        device = self._params[0][1].device if self._params else torch.device("cpu")
        self._group_index = torch.tensor([where[k] for k in keys], dtype=torch.long, device=device)
        self._flags = None  # kept when the first step begins

    def on_step_begin(self, args, state, control, **kwargs):
        if self._flags is not None:
            self._flags.begin_step()  # frozen between steps (a callback's on_step_end): deliberate
        elif self._model is not None:  # after every on_train_begin: what was frozen there is the user's choice
            if any(not p.requires_grad for _, p in self._params):
                self._watch(state)
            self._flags = FlagWatch(self._params, self._model)

    def _check_flags(self, step, state, control):  # requires-grad-changed, said once
        if self._flags is not None and (found := self._flags.check(step)) is not None:
            self._raise(control, state, found)

    def _said(self) -> set[str]:
        """Not said again as missing or unmoved: flipped in a step, frozen between steps, or named by the pre-flight."""
        return (set(self._flags.flipped) | self._flags.between if self._flags is not None else set()) | self._warned

    def _preflight(self, args, state, control, kwargs):
        """Probe the run's first batch with its model and optimizer before any step; report what is broken."""
        self.preflight_report, findings = trainer_preflight(self._model, args, kwargs, trainable=self.trainable,
                                                            note=self._note)
        # under torchrun each rank probed its own first batch: every rank takes every rank's findings (a collective,
        # reached by every rank, a failed probe included), so that all stop or raise together and rank 0 says all
        findings, _ = gather_findings(findings)
        self._warned = {p for f in findings if f.severity != "info" for p in f.params}
        for f in findings:
            if f.severity != "info":
                self._raise(control, state, f, phase="pre-flight")

    def _intended_frozen(self, control, state):
        """Without the pre-flight: the static check of `trainable` (no forward runs)."""
        report = inspect(self._model, static=True, trainable=self.trainable)
        for f in report.findings:
            if f.slug == "intended-param-frozen":
                self._raise(control, state, f, phase="pre-flight")

    def _note(self, text: str) -> None:
        if self._main:
            sys.stderr.write(f"gradflow: {text}\n")

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
    def _due(self, step: int) -> bool:
        return step == self._first or step % self.check_every == 0
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # grads are complete (accumulated, clipped) and not yet zeroed here
        self._pre_optimizer_seen = True
        step = self._step = state.global_step + 1
        self._check_flags(step, state, control)
        if self._due(step):
            self._check_grads(step, args, state, control)
        self._raise_pending(f"at step {step}")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # the scheduler has not stepped yet: param_groups still hold the lr this step used
        self._optimizer_seen = True
        self._moves.count_step(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        step = self._step = state.global_step
        judged = self._due(step) or step == self.moved_at_step or bool(self._moves.waiting)
        if not self._pre_optimizer_seen:
            self._check_flags(step, state, control)
        if not self._optimizer_seen:
            self._moves.count_step()  # no optimizer event (older transformers): count every step
        if not self._pre_optimizer_seen and self._due(step):
            # older transformers: no pre-optimizer event; grads may be zeroed by now, so only finite checks count
            if any(p.grad is not None for _, p in self._params):
                self._check_grads(step, args, state, control)
        if self._due(step):
            self._check_supervised(step, state, control)
        if self.moved_at_step is not None and step == self.moved_at_step:
            self._check_moved(step, state, control)
        elif self._moves.waiting:
            self._check_moved(step, state, control, self._moves.waiting)
        if judged:  # the only steps at which the watch (or its pre-flight, by step 1) can decide to stop
            self._agree_stop(control)
        self._raise_pending(f"at step {step}")

    def on_train_end(self, args, state, control, **kwargs):
        self._release()

    def _agree_stop(self, control) -> None:
        """Under DDP / FSDP (torchrun) every rank stops at the same step: when the watch on any rank decided to
        stop, all stop, recording the earliest such step; otherwise a rank that stops leaves the others waiting in
        their next gradient all-reduce. A collective, at steps every rank judges alike; nothing in one process."""
        agreed = agree_min(self.stopped_at)
        if agreed is not None:
            self.stopped_at = agreed
            control.should_training_stop = True

    def _release(self):  # the batch hook removed, the TensorBoard writer closed
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_batch = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._writer is not None and logs:
            keys = ("loss", "learning_rate", "grad_norm")
            write_scalars(self._writer, "train", {k: logs[k] for k in keys if k in logs}, state.global_step)

    def _check_grads(self, step, args, state, control):
        if not self._params:
            return
        said = self._said()
        missing = [n for n, p in self._params if p.grad is None and n not in said]
        present, layers, nonfinite = layer_norms(self._params, self._groups, self._group_index)
        self.last_layers = layers
        self.history.append({"step": step, "layers": layers, "missing": len(missing), "nonfinite": len(nonfinite)})
        if self._writer is not None:
            write_scalars(self._writer, "grad_norm_layer", layers, step)
        if missing:
            self._missing(step, missing, state, control)
        elif present and not nonfinite and not any(layers.values()) and not any(
                f.slug == "no-supervised-tokens" for f in self.findings):  # all zero, and no masked batch said so
            self._raise(control, state, finding("grad-all-zero", f"step {step}: every trainable parameter's gradient "
                                                "is exactly zero (zero loss weights or mask?)", params=[]))
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
            for f in probe_cause(self._model, self._last_batch):
                self._raise(control, state, f)

    def _check_supervised(self, step, state, control):
        if self._min_supervised is None:
            return
        # every rank must stop together, or the others hang in the next all-reduce
        value, self._min_supervised = agree_min(int(self._min_supervised)), None
        if value == 0 and not self._empty_seen:
            self._empty_seen = True
            if any(f.slug == "no-supervised-tokens" for f in self.findings):
                return  # the pre-flight named it already, on this same first batch: said once
            self._raise(control, state, finding(
                "no-supervised-tokens", f"by step {step}: a batch had no supervised token (every label -100); "
                                        "its loss is NaN or zero and teaches nothing"))

    def _check_moved(self, step, state, control, indices: list[int] | None = None):
        """Judge the parameters that can have moved by now; the rest wait for a later step (with a note)."""
        still, note = self._moves.judge(step, getattr(state, "max_steps", 0), indices)
        said = self._said()
        still = [n for n in still if n not in said]
        if note:
            self._note(note)
        if still:
            self._raise(control, state, finding(
                "adapter-not-updated", f"step {step}: {len(still)} of {len(self._params)} trainable parameters "
                                       f"have not changed since training began, first {still[0]}",
                location=still[0].rsplit(".", 1)[0], params=still))

    @property
    def moved_checked(self) -> bool:
        """Whether the moved-weights check has judged any parameter yet."""
        return self._moves.checked

    @property
    def moved_not_judged(self) -> list[str]:
        """The trainable parameters the moved-weights check has not judged yet (they cannot have moved)."""
        return self._moves.not_judged

    def moved(self) -> dict[str, bool]:
        """Per trainable parameter: has it changed since training began?"""
        return self._moves.moved()

    def _raise(self, control, state, f, phase: str | None = None):
        if any(g.slug == f.slug and g.message == f.message for g in self.findings):
            return
        with_hints([f], self._hint)  # as the probe's findings of a Trainer carry it (gradflow.api)
        self.findings.append(f)
        stops = f.severity == "error" and (self.stop_on_error or self.raise_on_error)
        if f.severity == "error":
            self._pending.append(f)
            if stops:
                control.should_training_stop = True
                if self.stopped_at is None:
                    self.stopped_at = self._step
        if not self._main:
            return
        if self.on_finding is not None:
            self.on_finding(f)
            return
        if not stops:
            then = ""
        elif self.raise_on_error:
            then = " — stopping the run (GradflowError)"
        elif phase == "pre-flight":
            # the Trainer reads should_training_stop only after a step: say so before that step runs (or raises)
            then = f" — stopping the run after {'its first' if self._step == 0 else 'the next'} step"
        else:
            then = " — stopping the run"
        sys.stderr.write(f"gradflow: {phase + ' ' if phase else ''}{f.severity}: {self._line(f)}{then}\n")

    def _line(self, f) -> str:
        """One finding on one line: code, slug, location, message and fix."""
        where = f" at {f.location}" if f.location else ""
        fix = f" | fix: {f.fix.title}" if f.fix is not None else ""
        here = f" | here: {f.fix.here}" if f.fix is not None and f.fix.here else ""
        return f"{f.code} {f.slug}{where}: {f.message}{fix}{here}"

    def _raise_pending(self, when: str) -> None:
        """With raise_on_error, end `trainer.train()` with a GradflowError carrying the new error findings."""
        pending, self._pending = self._pending, []
        if not (self.raise_on_error and pending):
            return
        self._release()  # on_train_end will not run: leave no hook on the model
        lines = "".join(f"\n  {self._line(f)}" for f in pending)
        raise GradflowError(f"GradFlowCallback stopped the run {when}: {len(pending)} error "
                            f"finding{'s' if len(pending) != 1 else ''}{lines}", findings=pending)
