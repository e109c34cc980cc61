"""The table of realistic training scripts: what each does without gradflow, and what gradflow must say, per stack.

Every script in this folder is written the way a user's train.py is: a `build()` that returns a Trainer, and
`build().train()` under `__main__`. The stacks differ: transformers 4.57 checkpoints reentrantly by default and
transformers 5.x does not, so some scripts are broken on one stack only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers.env import stack

HERE = Path(__file__).resolve().parent
STACK = stack()

# What `build().train()` does without gradflow:
RAISES = "raises"  # train() raises autograd's raw "element 0 of tensors does not require grad"
STUCK = "stuck"  # train() runs to the end without a word, and no watched weight moves
LEARNS = "learns"  # train() runs and every watched weight moves
PARTLY = "partly"  # train() runs to the end without a word; the watched weights under `location` never move
NO_BUILD = "no-build"  # build() itself raises: this stack's transformers refuses this stack's PEFT

RAW_ERROR = "element 0 of tensors does not require grad and does not have a grad_fn"


@dataclasses.dataclass(frozen=True)
class Case:
    script: str
    old: tuple[str, str | None]  # transformers 4.57: (behaviour without gradflow, the error slug gradflow gives)
    new: tuple[str, str | None]  # transformers 5.x: the same
    location: str | None = None  # where the slug's finding points (None: the fault is in no module)
    fix_word: str | None = None  # a word the fix title must contain
    # what GradFlowCallback names when its pre-flight cannot see the fault (a Trainer subclass's compute_loss runs
    # only in the real step): then it names it at the first step's check. None: the pre-flight names the slug.
    callback: str | None = None
    severity: str = "error"  # the slug's severity (a warning: the CLI exits 0 and the callback does not stop)

    @property
    def callback_slug(self) -> str | None:
        return self.callback or self.slug

    @property
    def behaviour(self) -> str:
        return getattr(self, STACK)[0]

    @property
    def slug(self) -> str | None:
        return getattr(self, STACK)[1]

    @property
    def path(self) -> Path:
        return HERE / f"{self.script}.py"

    def build(self, output_dir):
        return load(self.script).build(output_dir=str(output_dir))

    def __str__(self):
        return self.script


REENTRANT = "reentrant-checkpoint-no-input-grad"
LAYER0 = "base_model.model.model.layers.0"
TOWER = "base_model.model.model.vision_tower"
# transformers 4.57's CLIP tower keeps its layers under `vision_model.`; 5.x does not
TOWER_LAYERS = f"{TOWER}.vision_model.encoder.layers" if STACK == "old" else f"{TOWER}.encoder.layers"

CASES = [
    # broken
    Case("lora_gc_reentrant", old=(RAISES, REENTRANT), new=(LEARNS, None),
         location=LAYER0, fix_word="enable_input_require_grads"),
    Case("lora_head_gc_reentrant", old=(STUCK, REENTRANT), new=(LEARNS, None),
         location=LAYER0, fix_word="enable_input_require_grads"),
    Case("adapter_resume_frozen", old=(RAISES, "adapter-frozen"), new=(RAISES, "adapter-frozen"),
         location=f"{LAYER0}.self_attn.q_proj.lora_A.default", fix_word="is_trainable=True"),
    Case("custom_loss_detached", old=(STUCK, "loss-detached"), new=(STUCK, "loss-detached"),
         location=None, fix_word="detach", callback="grad-missing-in-training"),
    Case("sft_optimizer_missing", old=(STUCK, "param-not-in-optimizer"), new=(STUCK, "param-not-in-optimizer"),
         location=f"{LAYER0}.self_attn.q_proj.lora_B.default", fix_word="optimizer"),
    Case("completion_only_truncated", old=(STUCK, "no-supervised-tokens"), new=(STUCK, "no-supervised-tokens"),
         location=None, fix_word="labels"),
    # issue 18: every trainable tensor without a gradient is explained
    Case("loss_weights_zero", old=(STUCK, "grad-all-zero"), new=(STUCK, "grad-all-zero"),
         location="transformer", fix_word="weights", callback="grad-all-zero"),
    Case("set_adapter_in_loss", old=(STUCK, "requires-grad-changed"), new=(STUCK, "requires-grad-changed"),
         location="base_model.model.model.layers", fix_word="set_adapter", callback="requires-grad-changed"),
    Case("vlm_unused_layer", old=(PARTLY, "trainable-param-unused"), new=(PARTLY, "trainable-param-unused"),
         location=f"{TOWER_LAYERS}.1", fix_word="Freeze", severity="warning"),
    Case("value_head_unused", old=(PARTLY, "trainable-param-unused"), new=(PARTLY, "trainable-param-unused"),
         location="value_head", fix_word="Freeze", severity="warning"),
    Case("vlm_tower_no_grad", old=(PARTLY, "graph-break"), new=(PARTLY, "graph-break"),
         location=TOWER, fix_word="no_grad"),
    # healthy
    Case("lora_gc_non_reentrant", old=(LEARNS, None), new=(LEARNS, None)),
    Case("sft_lora", old=(LEARNS, None), new=(LEARNS, None)),
    Case("custom_loss", old=(LEARNS, None), new=(LEARNS, None)),
    Case("adapter_resume_trainable", old=(LEARNS, None), new=(LEARNS, None)),
    Case("add_adapter_gc", old=(LEARNS, None), new=(NO_BUILD, None)),
]
BY_NAME = {c.script: c for c in CASES}

# gradflow bugs in probing a Trainer (CLI and API) found by these scripts and not fixed yet: script -> reason
# (those tests are strict xfails). Empty: the one they found (a BatchEncoding batch read as no dict) is fixed.
KNOWN_BUGS: dict[str, str] = {}


def params(cases, *, only=None, bugs=KNOWN_BUGS):
    """pytest params for `cases` on this stack (those whose build() fails here left out), `bugs` as strict xfails."""
    out = []
    for case in cases:
        if case.behaviour == NO_BUILD or (only is not None and not only(case)):
            continue
        marks = [pytest.mark.xfail(strict=True, reason=bugs[case.script])] if case.script in bugs else []
        out.append(pytest.param(case, id=case.script, marks=marks))
    return out


@functools.cache
def load(script: str):
    """The script as a module (imported once; each build() makes a fresh trainer)."""
    spec = importlib.util.spec_from_file_location(f"realistic_{script}", HERE / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def watched(model) -> dict[str, torch.nn.Parameter]:
    """The weights that must move in a healthy run: every lora_B (they start at zero), else every trainable one."""
    named = dict(model.named_parameters())
    lora_b = {n: p for n, p in named.items() if "lora_B" in n}
    return lora_b or {n: p for n, p in named.items() if p.requires_grad}


@dataclasses.dataclass
class Outcome:
    error: BaseException | None
    moved: set  # names of the watched weights that changed
    watched: set
    other_moved: set  # names of the other parameters that changed
    losses: list  # the losses the Trainer logged


def train_and_watch(trainer) -> Outcome:
    """`trainer.train()` as the script runs it, and what it did to the weights."""
    named = dict(trainer.model.named_parameters())
    watch = watched(trainer.model)
    start = {n: p.detach().clone() for n, p in named.items()}
    error = None
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - what the user would see is the thing under test
        error = exc
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), start[n])}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return Outcome(error, changed & set(watch), set(watch), changed - set(watch), losses)
