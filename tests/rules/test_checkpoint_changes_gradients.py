"""checkpoint-changes-gradients: gradients with checkpointing on differ from those with it off (--check-gc)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.helpers.builders import (Block, assert_fires, assert_silent, base, batch, disable_input_grad_hook, enable_gc,
                                    lora, lora_config, probe, tiny_batch, tiny_lm)

SLUG = "checkpoint-changes-gradients"


# --- modules whose recomputation is not their forward -------------------------------------------------------------
class NoisyInput(nn.Module):
    """Multiplicative noise on the input of `inner` (a stochastic regulariser that is no nn.Dropout)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x * (1 + 0.1 * torch.randn_like(x)))


class FunctionalDropout(nn.Module):
    """F.dropout called directly: no nn.Dropout module to set to p=0, so the RNG decides."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(F.dropout(x, p=0.2, training=self.training))


class BufferCounter(nn.Module):
    """Mutates a buffer in its forward, and the buffer feeds the output: the recomputation sees another value."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * (1 + 0.1 * self.calls)


class AttributeCounter(nn.Module):
    """The same with a plain Python attribute (a cache index, a step counter)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * (1 + 0.1 * self.calls)


class GradModeBranch(nn.Module):
    """Branches on torch.is_grad_enabled(): a reentrant checkpoint runs the first forward under no_grad."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out * 2.0 if torch.is_grad_enabled() else out


def wrap_mlps(model, wrapper):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.model.layers:
        layer.mlp = wrapper(layer.mlp)
    return model


def gc_lora(preset="tiny-llama", *, reentrant=False, **gc_kwargs):
    """Checkpointing on first, then LoRA (so reentrant regions get the input-grad hook on both stacks)."""
    model = base(preset)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant, **gc_kwargs})
    model = get_peft_model(model, lora_config())
    model.enable_input_require_grads()
    return model


LAYER0 = "base_model.model.model.layers.0."


def _check(model, data=None, **kwargs):
    return probe(model, data if data is not None else batch(model), check_gc=True, **kwargs)


# --- fires --------------------------------------------------------------------------------------------------------
def test_noise_without_preserved_rng_state():
    model = wrap_mlps(gc_lora(preserve_rng_state=False), NoisyInput)
    report = _check(model)
    finding = assert_fires(report, SLUG)
    assert finding.location.startswith(LAYER0)  # the layer whose recomputation drew other noise
    gc = report.snapshot.gc_equivalence
    assert gc.mode == "non-reentrant" and not gc.enabled_for_check
    assert all(d.kind == "differs" and d.rel_diff > 1e-3 for d in gc.diffs)


def test_functional_dropout_without_preserved_rng_state_reentrant():
    model = wrap_mlps(gc_lora(reentrant=True, preserve_rng_state=False), FunctionalDropout)
    finding = assert_fires(_check(model), SLUG)
    assert "reentrant checkpointing" in finding.message


def test_buffer_mutated_in_forward():
    model = wrap_mlps(gc_lora(), BufferCounter)
    report = _check(model)
    assert_fires(report, SLUG)
    # the check's own runs are undone: the counter shows only the probe's forward and its recomputation
    assert [float(layer.mlp.calls) for layer in model.get_base_model().model.layers] == [2.0] * 4


def test_attribute_counter_on_a_model_without_checkpointing():
    """The model does not checkpoint: the check turns transformers' checkpointing on, then off again."""
    model = wrap_mlps(lora(), AttributeCounter)
    report = _check(model)
    finding = assert_fires(report, SLUG)
    assert "turned on for the check" in finding.message
    assert report.snapshot.gc_equivalence.enabled_for_check
    assert report.model["gradient_checkpointing"] == "off"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_grad_mode_branch_under_reentrant_checkpointing():
    model = wrap_mlps(gc_lora(reentrant=True), GradModeBranch)
    report = _check(model)
    assert_fires(report, SLUG)
    assert report.snapshot.gc_equivalence.mode == "reentrant"


class OwnCheckpointBlock(Block):
    """A user's own checkpoint call around a noisy block, with preserve_rng_state=False."""

    def forward(self, x):
        return checkpoint(lambda h: x + self.act(self.proj(h * (1 + 0.1 * torch.randn_like(h)))), x,
                          use_reentrant=False, preserve_rng_state=False)


def test_own_checkpoint_calls_in_a_custom_model():
    model = tiny_lm(block=OwnCheckpointBlock, freeze=False)
    report = _check(model, tiny_batch())
    finding = assert_fires(report, SLUG)
    assert {"blocks.0.proj.weight", "blocks.2.proj.weight"} <= set(finding.params)
    assert not report.snapshot.gc_equivalence.enabled_for_check


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_on_tiny_phi3_lora_non_reentrant():
    model = gc_lora("tiny-phi3")
    report = _check(model)
    assert_silent(report, SLUG)
    gc = report.snapshot.gc_equivalence
    assert gc.compared and gc.params_compared == sum(p.requires_grad for p in model.parameters()) and not gc.diffs


def test_silent_on_tiny_phi3_lora_reentrant():
    report = _check(gc_lora("tiny-phi3", reentrant=True))
    assert_silent(report, SLUG)
    assert report.snapshot.gc_equivalence.mode == "reentrant"


def test_silent_with_lora_dropout_and_preserved_rng_state():
    """nn.Dropout is set to p=0 for the check (and put back); preserve_rng_state=True keeps noise equal anyway."""
    model = base("tiny-llama")
    enable_gc(model, reentrant=False)
    model = wrap_mlps(get_peft_model(model, lora_config(lora_dropout=0.1)), NoisyInput)
    report = _check(model)
    assert_silent(report, SLUG)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.1 for m in drops)


def test_silent_on_a_model_without_checkpointing_when_its_forward_is_pure():
    report = _check(lora("tiny-phi3"))
    assert_silent(report, SLUG)
    assert report.snapshot.gc_equivalence.enabled_for_check


def test_silent_when_the_model_cannot_checkpoint():
    report = _check(tiny_lm(freeze=False), tiny_batch())
    assert_silent(report, SLUG)
    gc = report.snapshot.gc_equivalence
    assert not gc.compared and "nothing to compare" in gc.reason


def test_reentrant_region_without_input_grad_is_left_to_its_own_rule():
    model = base("tiny-llama")
    model = get_peft_model(model, lora_config())
    enable_gc(model, reentrant=True)
    disable_input_grad_hook(model)
    model.config.use_cache = False
    report = _check(wrap_mlps(model, NoisyInput))
    assert "reentrant-checkpoint-no-input-grad" in report.slugs()
    assert_silent(report, SLUG)


def test_silent_without_check_gc():
    model = wrap_mlps(gc_lora(preserve_rng_state=False), NoisyInput)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.snapshot.gc_equivalence is None
