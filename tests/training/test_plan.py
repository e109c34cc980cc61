"""The memory plan: the least checkpointing that fits, fewer tokens only when nothing fits, and flags override it.

CPU, tiny-llama (4 decoder layers), seq 64: the plan's estimate comes from counting the forward's saved activations.
"""

from __future__ import annotations

import dataclasses
import re
import json
from importlib import resources

import pytest
import torch
from torch.testing import assert_close

import gradflow
from gradflow.errors import GradflowError
from gradflow.models import decoder_layers
from gradflow.setup.build import SetupOptions
from gradflow.training.options import TrainOptions
from gradflow.training.plan import HEADROOM, make_plan

DEMO = str(resources.files("gradflow") / "data" / "think_demo.jsonl")


def _setup():
    from gradflow.setup.load import load_setup

    return load_setup("tiny-llama", SetupOptions(gc="non-reentrant"))  # what train builds before planning


def _mib_for(peak: int) -> str:
    """A --max-memory whose budget after headroom is just above `peak`."""
    return f"{(peak / HEADROOM + 4096) / 2 ** 20:.4f}MiB"


def _flags(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in decoder_layers(model, checkpointable=True)]


def test_plenty_of_memory_turns_checkpointing_off_and_less_turns_it_on():
    setup = _setup()
    opts = TrainOptions(seq_len=64, batch_size=4)
    roomy = make_plan(setup, opts, gc_from="plan")
    assert roomy.gc_every == 0 and roomy.tokens_per_batch == 256 and roomy.layers == 4
    assert _flags(setup.model) == [False] * 4
    est = roomy.estimate
    assert est.how == "saved activations" and est.per_token_off > est.per_token_all > 0
    # just enough for one checkpointed layer in four: every 4th layer, the same tokens
    one = make_plan(setup, dataclasses.replace(opts, max_memory=_mib_for(est.peak(256, 1))), gc_from="plan")
    assert (one.gc_every, one.checkpointed, one.tokens_per_batch) == (4, 1, 256)
    assert _flags(setup.model) == [True, False, False, False]
    assert "checkpointing off would need" in one.why
    # less than full checkpointing needs at 256 tokens: every layer, fewer tokens (never below --seq-len)
    tight = make_plan(setup, dataclasses.replace(opts, max_memory=_mib_for(est.peak(160, 4))), gc_from="plan")
    assert tight.gc_every == 1 and 64 <= tight.tokens_per_batch < 256 and tight.tokens_from == "plan"
    assert _flags(setup.model) == [True] * 4
    assert tight.expected_peak <= tight.budget


def test_flags_override_the_plan():
    setup = _setup()
    est = make_plan(setup, TrainOptions(seq_len=64), gc_from="plan").estimate
    small = _mib_for(est.peak(256, 4))
    forced = make_plan(setup, TrainOptions(seq_len=64, gc_every=2, tokens_per_batch=256, max_memory=small),
                       gc_from="plan")
    assert (forced.gc_every, forced.gc_from, forced.tokens_per_batch, forced.tokens_from) == \
        (2, "--gc-every", 256, "--tokens-per-batch")
    assert _flags(setup.model) == [True, False, True, False]
    user_gc = make_plan(setup, TrainOptions(seq_len=64), gc_from="--gc")  # --gc non-reentrant: every layer stays
    assert user_gc.gc_every == 1 and user_gc.gc_from == "--gc" and _flags(setup.model) == [True] * 4


def test_a_resumed_run_keeps_its_checkpoints_token_budget():
    setup = _setup()
    resumed = make_plan(setup, TrainOptions(seq_len=64, max_memory="3MiB"), gc_from="plan", resumed_tokens=256)
    assert (resumed.tokens_per_batch, resumed.tokens_from) == (256, "checkpoint")


def test_per_layer_checkpointing_leaves_gradients_unchanged():
    setup = _setup()
    model = setup.model
    layers = decoder_layers(model, checkpointable=True)
    batch = {"input_ids": torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"].clone()
    grads = []
    model.train()
    for every in (0, 2):
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = every > 0 and i % every == 0
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_train_records_the_plan_and_a_smaller_budget_changes_it(tmp_path):
    runs = {}
    for name, memory in (("roomy", None), ("tight", "64MiB")):  # 64 MiB, the least it takes: tight at 2048
        out = tmp_path / name
        report = gradflow.train("tiny-llama", DEMO, str(out), max_steps=1, seq_len=2048, progress=False,
                                max_memory=memory)
        assert report.extra["train"]["status"] == "completed"
        runs[name] = json.loads((out / "report.json").read_text())["plan"]
    assert runs["roomy"]["gc"] == "off" and runs["roomy"]["gc_from"] == "plan"
    assert runs["tight"]["budget_from"] == "--max-memory 64MiB"
    assert (runs["tight"]["gc_every"], runs["tight"]["tokens_per_batch"]) != \
        (runs["roomy"]["gc_every"], runs["roomy"]["tokens_per_batch"])


@pytest.mark.parametrize("size", ["0.1B", "1", "63.9MiB", "0.06GiB"])
def test_max_memory_below_64_mib_is_refused_whatever_the_unit(size):
    with pytest.raises(GradflowError, match=rf"--max-memory {re.escape(size)} is less than 64 MiB"):
        TrainOptions(max_memory=size).validate()
    TrainOptions(max_memory="64MiB").validate()


def test_bad_max_memory_is_a_one_line_error():
    from gradflow.errors import GradflowError

    with pytest.raises(GradflowError, match="--max-memory '24 parsecs' is not a memory size"):
        TrainOptions(max_memory="24 parsecs").validate()


def test_measuring_leaves_no_activations_behind():
    """The CPU estimate counts what the forward saves through saved_tensors_hooks; a pack hook that returns an
    output tensor itself ties it to its own grad_fn, a cycle that gc cannot free: every measured forward's
    activations would stay for the rest of the run."""
    import gc

    setup = _setup()
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    make_plan(setup, TrainOptions(seq_len=64, batch_size=4), gc_from="plan")
    gc.collect()
    left = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before]
    assert left == []
