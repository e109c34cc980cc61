"""reentrant-checkpoint-no-input-grad: a reentrant checkpointed region whose inputs do not require grad."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import gradflow
from tests.helpers.builders import (STACK, Checkpointed, assert_fires, assert_silent, base, batch, custom_lora,
                                    disable_input_grad_hook, enable_gc, lora, lora_config, probe,
                                    save_adapter_and_reload, tiny_batch, tiny_lm)

SLUG = "reentrant-checkpoint-no-input-grad"
LAYER0 = "base_model.model.model.layers.0"


def _assert_cut(report, *, loud: bool = True, location: str = LAYER0):
    finding = assert_fires(report, SLUG, location=location)
    assert report.loss["requires_grad"] is (not loud)
    assert ("the loss has no grad_fn" in finding.message) is loud
    lost = {p.name for p in report.snapshot.params if p.requires_grad and p.grad == "none"}
    assert set(finding.params) == lost and lost
    # the other explanations of missing gradients stand back
    assert_silent(report, "graph-break", "loss-detached", "trainable-param-unused")
    return finding


def _assert_flows(report):
    assert_silent(report, SLUG)
    grads = [p.grad for p in report.snapshot.params if p.requires_grad]
    assert grads and all(g in ("ok", "zero") for g in grads)


def test_peft_before_reentrant_checkpointing():
    """SPEC §1's call order: get_peft_model, then gradient_checkpointing_enable(use_reentrant=True)."""
    model = lora("tiny-phi3")
    enable_gc(model, reentrant=True)
    report = probe(model, batch(model))
    if STACK == "old":  # 4.57 never installs the input-grad hook in this order
        finding = _assert_cut(report)
        assert "no input-grad hook" in finding.message and "layers.0–3" in finding.message
    else:  # transformers 5 installs the hook inside gradient_checkpointing_enable
        _assert_flows(report)


def test_seed_demo_factory():
    from gradflow.demos import seed_bug

    setup = seed_bug()
    report = gradflow.probe(setup["model"], setup["batch"])
    _assert_cut(report)


def _hooked_then_unhooked(order: str):
    if order == "gc-first":
        model = get_peft_model(enable_gc(base(), reentrant=True), lora_config())
    else:
        model = enable_gc(lora(), reentrant=True)
    return disable_input_grad_hook(model)


@pytest.mark.parametrize("order", ["gc-first", "peft-first"])
def test_removed_input_grad_hook(order):
    """The input-grad hook taken off again with disable_input_require_grads()."""
    model = _hooked_then_unhooked(order)
    report = probe(model, batch(model))
    if order == "gc-first" and STACK == "new":
        # transformers 5 hooked the embedding in gradient_checkpointing_enable and PEFT hooked it again;
        # disable_input_require_grads only removes the last one, so gradients still flow
        assert report.snapshot.input_grad_hook
        _assert_flows(report)
    else:
        assert not report.snapshot.input_grad_hook
        _assert_cut(report)


def test_inputs_embeds_passed_directly():
    """The hook sits on the embedding module, which never runs when inputs_embeds is given."""
    model = enable_gc(base(), reentrant=True)
    model = get_peft_model(model, lora_config())
    data = batch(model)
    # embeddings precomputed from the weight (a cache, or merged with other features): no module call, no hook
    data["inputs_embeds"] = torch.nn.functional.embedding(data.pop("input_ids"), model.get_input_embeddings().weight)
    report = probe(model, data)
    finding = _assert_cut(report)
    assert "inputs_embeds" in finding.message


def test_reloaded_adapter_then_checkpointing(tmp_path):
    """A trainable adapter reloaded with PeftModel.from_pretrained, checkpointing turned on afterwards."""
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=True)
    enable_gc(model, reentrant=True)
    report = probe(model, batch(model))
    if STACK == "old":
        _assert_cut(report)
    else:
        _assert_flows(report)


def test_custom_checkpoint_wrapper_loud():
    """A custom model checkpointing its own blocks (use_reentrant=True) behind a frozen embedding."""
    model = tiny_lm()
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=True)
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    finding = _assert_cut(report, location="base_model.model.blocks.0.inner")
    assert "base_model.model.blocks.0.inner" in finding.message


def test_custom_checkpoint_wrapper_silent_when_the_head_trains():
    """Same cut, but the head after the regions is trainable: the loss has a grad_fn, no error is raised."""
    model = tiny_lm()
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=True)
    model.head.requires_grad_(True)
    model = custom_lora(model, modules_to_save=["head"])
    report = probe(model, tiny_batch())
    finding = _assert_cut(report, loud=False, location="base_model.model.blocks.0.inner")
    assert "silent" in finding.message
    assert all(".blocks." in p for p in finding.params)


def test_static_inspect_predicts_it():
    """Without a forward, inspect --static predicts the cut from the checkpointing state and the missing hook."""
    model = _hooked_then_unhooked("peft-first")
    report = gradflow.inspect(model, static=True)
    finding = assert_fires(report, SLUG, location=LAYER0)
    assert "predicted" in finding.message


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_checkpointing_comes_before_peft():
    model = enable_gc(base("tiny-phi3"), reentrant=True)
    model = get_peft_model(model, lora_config())
    _assert_flows(probe(model, batch(model)))
    assert_silent(gradflow.inspect(model, static=True), SLUG)


@pytest.mark.parametrize("order", ["gc-first", "peft-first"])
def test_silent_with_non_reentrant_checkpointing_and_no_hook(order):
    """Non-reentrant checkpointing needs no input that requires grad."""
    if order == "gc-first":
        model = get_peft_model(enable_gc(base(), reentrant=False), lora_config())
    else:
        model = enable_gc(lora(), reentrant=False)
    disable_input_grad_hook(model)
    report = probe(model, batch(model))
    _assert_flows(report)
    assert report.snapshot.gc_mode == "non-reentrant"


def test_silent_with_a_custom_wrapper_and_an_input_grad_hook():
    model = tiny_lm()
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=True)
    model.embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model = custom_lora(model)
    _assert_flows(probe(model, tiny_batch()))


def test_silent_with_a_custom_non_reentrant_wrapper():
    model = tiny_lm()
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=False)
    model = custom_lora(model)
    _assert_flows(probe(model, tiny_batch()))


def test_silent_with_inputs_embeds_that_require_grad():
    """inputs_embeds built from a graph that requires grad (e.g. a trainable prompt) feed the regions."""
    model = enable_gc(base(), reentrant=True)
    model = get_peft_model(model, lora_config())
    data = batch(model)
    embeds = model.get_input_embeddings()(data.pop("input_ids"))
    data["inputs_embeds"] = embeds.detach().requires_grad_(True)
    _assert_flows(probe(model, data))
