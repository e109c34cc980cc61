"""ddp-reentrant-checkpoint: reentrant checkpointing under DDP with find_unused_parameters=True.

DDP runs for real on the CPU: a gloo process group of one rank, which is enough for the fault to break a step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradflow
from gradflow.api import snapshot
from gradflow.rules import run_rules
from tests.helpers.builders import (STACK, Checkpointed, assert_fires, assert_silent, base, batch, enable_gc, lora,
                                    probe, tiny_batch, tiny_lm)
from tests.helpers.dist import process_group  # noqa: F401  (fixture)

SLUG = "ddp-reentrant-checkpoint"
MARKED_TWICE = "Expected to mark a variable ready only once"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _lora_gc(*, reentrant: bool):
    """LoRA over tiny-llama, checkpointed by transformers, with the input-grad hook that reentrant mode needs."""
    model = lora()
    enable_gc(model.get_base_model(), reentrant=reentrant)
    model.enable_input_require_grads()
    return model


def _train_step(model, data, steps: int = 2) -> str | None:
    """Plain AdamW steps through `model` (the DDP wrapper), no gradflow involved: None, or the first error line."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    try:
        for _ in range(steps):
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


# --- fires ------------------------------------------------------------------------------------------------------------
def test_lora_with_reentrant_gc_under_ddp_find_unused(process_group):
    model = _lora_gc(reentrant=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    data = batch(model)
    finding = assert_fires(gradflow.inspect(ddp, static=True), SLUG,
                           location="module.base_model.model.model.layers.0")
    assert "module.base_model.model.model.layers.0–3" in finding.message
    assert finding.fix.applicability == "display-only"
    report = probe(ddp, data)  # the probe's backward raises the error, and the rule names why
    assert_fires(report, SLUG)
    assert MARKED_TWICE in report.loss["error"]
    # a failed backward leaves DDP's reducer broken: train through a fresh wrapper
    fresh = DistributedDataParallel(model, find_unused_parameters=True)
    assert _train_step(fresh, data).startswith(MARKED_TWICE)  # the first backward already


def test_full_finetune_with_reentrant_gc_under_ddp_find_unused(process_group):
    model = enable_gc(base(), reentrant=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    assert_fires(gradflow.inspect(ddp, static=True), SLUG, location="module.model.layers.0")
    assert _train_step(ddp, batch(model)).startswith(MARKED_TWICE)


def test_users_own_reentrant_checkpoint_seen_by_the_probe(process_group):
    """A custom model whose forward calls torch.utils.checkpoint(use_reentrant=True) itself: no transformers flag
    to read, so the probe's trace of the checkpoint calls finds it."""
    model = tiny_lm(freeze=False)
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=True)
    assert_silent(gradflow.inspect(DistributedDataParallel(model, find_unused_parameters=True), static=True), SLUG)
    report = probe(DistributedDataParallel(model, find_unused_parameters=True), tiny_batch())
    assert_fires(report, SLUG, location="module.blocks.0.inner")
    assert MARKED_TWICE in report.loss["error"]


def test_trainer_arguments_fill_the_snapshot(tmp_path):
    """The Trainer path: the model is not wrapped yet; whoever builds the snapshot copies what the Trainer will pass
    to DDP (ddp_find_unused_parameters) and enables checkpointing as its arguments say."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), ddp_find_unused_parameters=True, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": True}, report_to=[])
    model = lora()
    enable_gc(model.get_base_model(), reentrant=args.gradient_checkpointing_kwargs["use_reentrant"])
    snap = snapshot(model, static=True)
    assert snap.ddp_find_unused is None  # not wrapped: describe() cannot know
    assert not [f for f in run_rules(snap) if f.slug == SLUG]
    snap.ddp_find_unused = args.ddp_find_unused_parameters
    found = [f for f in run_rules(snap) if f.slug == SLUG]
    assert len(found) == 1 and found[0].location == "base_model.model.model.layers.0"


def test_trainer_default_checkpointing_per_stack(tmp_path):
    """With no gradient_checkpointing_kwargs the Trainer enables checkpointing with None: reentrant on 4.57,
    non-reentrant on 5.x. Only the old stack trips the rule."""
    model = lora()
    target = model.get_base_model()
    if STACK == "new":
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=None)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
    snap = snapshot(model, static=True)
    snap.ddp_find_unused = True
    found = [f for f in run_rules(snap) if f.slug == SLUG]
    assert snap.gc_mode == ("non-reentrant" if STACK == "new" else "reentrant")
    assert len(found) == (0 if STACK == "new" else 1)


# --- stays silent -----------------------------------------------------------------------------------------------------
def test_silent_non_reentrant_gc_under_ddp_find_unused(process_group):
    model = _lora_gc(reentrant=False)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    report = gradflow.inspect(ddp, static=True)
    assert_silent(report, SLUG)
    assert report.snapshot.ddp_find_unused is True
    assert _train_step(ddp, batch(model)) is None


def test_silent_reentrant_gc_without_find_unused(process_group):
    model = _lora_gc(reentrant=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    report = gradflow.inspect(ddp, static=True)
    assert_silent(report, SLUG)
    assert report.snapshot.ddp_find_unused is False
    assert _train_step(ddp, batch(model)) is None


@pytest.mark.filterwarnings("ignore:You passed find_unused_parameters=true:UserWarning")
def test_silent_reentrant_gc_with_static_graph(process_group):
    """static_graph=True lets DDP handle reentrant checkpointing even with find_unused_parameters=True."""
    model = _lora_gc(reentrant=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True, static_graph=True)
    assert_silent(gradflow.inspect(ddp, static=True), SLUG)
    assert _train_step(ddp, batch(model), steps=3) is None


def test_silent_without_ddp():
    model = _lora_gc(reentrant=True)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.snapshot.ddp_find_unused is None
