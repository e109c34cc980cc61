"""nested-checkpoint: a checkpointed region inside another one whose inner call gets no tensor inputs."""

from __future__ import annotations

import functools
import pytest
import torch
from peft import get_peft_model
from torch.utils.checkpoint import checkpoint

from tests.helpers.builders import (STACK, Block, Checkpointed, KeywordCheckpointed, assert_fires, assert_silent, base,
                                    batch, custom_lora, enable_gc, lora_config, probe, tiny_batch, tiny_lm, wrap_layers)

SLUG = "nested-checkpoint"


def _gc_lora(preset: str = "tiny-llama"):
    """Per-layer reentrant checkpointing turned on before get_peft_model, so the input-grad hook is there."""
    return get_peft_model(enable_gc(base(preset), reentrant=True), lora_config())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3"])
def test_outer_checkpoint_calls_checkpointed_layers_by_keyword(preset):
    """SPEC §1: an outer reentrant checkpoint around decoder layers that checkpoint themselves, called with
    keyword arguments only, so the inner checkpoint sees no tensor input."""
    model = wrap_layers(_gc_lora(preset), KeywordCheckpointed)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG)
    # 4.57 checkpoints the inner layer in the outer region's no-grad forward already; 5.x only when grad is on,
    # that is when backward recomputes the outer region, which starts from the last layer
    assert finding.location == f"base_model.model.model.layers.{0 if STACK == 'old' else 3}.inner"
    assert "keyword-only" in finding.message
    # the recomputation in backward is where it breaks
    assert report.loss["error_phase"] == "backward"
    assert "this checkpoint() is not necessary" in report.loss["error"]
    assert "this checkpoint() is not necessary" in finding.message
    assert finding.fix.applicability == "safe"  # the inner checkpointing is transformers': turning it off is safe
    assert_silent(report, "reentrant-checkpoint-no-input-grad", "graph-break")


class InnerCheckpointBlock(Block):
    """A custom block that checkpoints its projection through a partial: the inner call has no tensor argument."""

    def forward(self, x):
        branch = checkpoint(functools.partial(self.proj, x), use_reentrant=True)
        return x + self.act(branch)


def test_custom_block_checkpoints_a_partial_inside_an_outer_checkpoint():
    model = tiny_lm(block=InnerCheckpointBlock)
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = Checkpointed(block, reentrant=True)
    model.embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG)
    assert finding.location == "base_model.model.blocks.0.inner.proj"
    assert finding.message.startswith("3 checkpointed regions")
    assert finding.fix.applicability == "display-only"  # user code: gradflow shows what to change
    # silent: the block's residual keeps the loss connected, only the adapters inside the partial get nothing
    assert report.loss["error"] is None and report.loss["requires_grad"]
    assert "6 trainable parameters inside get no gradient" in finding.message


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_the_outer_wrapper_passes_hidden_states_positionally():
    """Nested, but the inner checkpoint gets the hidden states as a tensor argument: it works."""
    model = wrap_layers(_gc_lora(), Checkpointed)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.loss["error"] is None
    nested = [c for c in report.snapshot.checkpoints if c.depth >= 1]
    assert nested and all(c.tensor_args == 1 for c in nested)
    grads = [p.grad for p in report.snapshot.params if p.requires_grad]
    assert grads and all(g in ("ok", "zero") for g in grads)


def test_silent_with_one_level_of_checkpointing():
    model = _gc_lora()
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.snapshot.checkpoints and all(c.depth == 0 for c in report.snapshot.checkpoints)


def test_silent_when_the_outer_wrapper_replaces_per_layer_checkpointing():
    """The keyword-calling wrapper alone (transformers' own checkpointing off) is a single level."""
    model = get_peft_model(base(), lora_config())
    model.get_base_model().enable_input_require_grads()
    wrap_layers(model, KeywordCheckpointed)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.loss["error"] is None


def test_silent_for_a_custom_block_checkpointing_a_partial_without_an_outer_region():
    """A partial with no tensor argument, but not nested: odd, yet the gradients do flow through the lora layers."""
    model = tiny_lm(block=InnerCheckpointBlock)
    model.embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert torch.isfinite(torch.tensor(report.loss["value"]))
