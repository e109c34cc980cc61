"""graph-break: a module whose output no longer depends on its input or parameters through autograd."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.builders import (Block, DetachedBranch, assert_fires, assert_silent, base, batch, custom_lora,
                                    custom_with, enable_gc, findings, lora, lora_config, probe,
                                    tiny_batch, tiny_lm)
from tests.helpers.peft_methods import NoGradPrefix

SLUG = "graph-break"


def _lora_ids(report, *layers):
    return {p.name for p in report.snapshot.params
            if p.requires_grad and any(f".layers.{i}." in p.name for i in layers)}


class DataBranch(Block):
    """Residual block that reads the branch through .data."""

    def forward(self, x):
        return x + self.act(self.proj(x)).data


class FakeQuantBranch(Block):
    """A naive activation fake-quant: the int8 cast has no gradient."""

    def forward(self, x):
        y = self.act(self.proj(x))
        return x + (y * 127).to(torch.int8).to(x.dtype) / 127


class ComparisonGate(Block):
    """Gates the stream with a comparison of the projection: a hard mask carries no gradient."""

    def forward(self, x):
        return x * (self.proj(x) > 0).to(x.dtype)


class DetachedStream(Block):
    """Detaches the whole hidden stream (features 'frozen' by hand)."""

    def forward(self, x):
        return (x + self.act(self.proj(x))).detach()


@pytest.mark.parametrize("block", [DetachedBranch, DataBranch, FakeQuantBranch, ComparisonGate])
def test_fires_where_a_custom_module_cuts_its_branch(block):
    model = custom_with(block)
    report = probe(model, tiny_batch())
    # silent in training: the stream still carries grad, so the loss has a grad_fn and no error is raised
    assert report.loss["requires_grad"] is True
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1")
    assert sorted(finding.params) == ["base_model.model.blocks.1.proj.lora_A.default.weight",
                                      "base_model.model.blocks.1.proj.lora_B.default.weight"]
    assert block.__name__ in finding.message
    assert_silent(report, "loss-detached", "reentrant-checkpoint-no-input-grad", "trainable-param-unused")


def test_fires_where_a_custom_module_detaches_the_stream():
    model = custom_with(DetachedStream)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1")
    # everything upstream of the cut is lost, not only the parameters inside it
    assert {n.split(".proj.")[0] for n in finding.params} == {"base_model.model.blocks.0", "base_model.model.blocks.1"}
    state = {p.name: p.grad for p in report.snapshot.params if p.requires_grad}
    assert state["base_model.model.blocks.2.proj.lora_B.default.weight"] == "ok"


class Watched(Block):
    """Counts its forward runs and the torch-function modes active in each (the probe's op watcher is one)."""

    def __init__(self, width, *, detach: bool):
        super().__init__(width)
        self.detach, self.modes, self.sums, self.drop = detach, [], [], torch.nn.Dropout(0.5)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # like BatchNorm's num_batches_tracked

    def forward(self, x):
        self.steps += 1
        self.modes.append(len(torch.overrides._get_current_function_mode_stack()))
        branch = self.drop(self.act(self.proj(x)))
        self.sums.append(float(branch.detach().sum()))
        return x + (branch.detach() if self.detach else branch)


def test_a_healthy_probe_runs_one_forward_with_no_op_watcher():
    model = custom_with(lambda width: Watched(width, detach=False))
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert model.base_model.model.blocks[1].modes == [0]  # the step itself, not watched op by op (SPEC §9's cost)


def test_a_cut_is_located_by_replaying_the_step_with_the_op_watcher():
    model = custom_with(lambda width: Watched(width, detach=True))
    torch.manual_seed(3)
    report = probe(model, tiny_batch())
    block = model.base_model.model.blocks[1]
    # the step, then its replay with the watcher on, from the same RNG streams: the same dropout masks
    assert block.modes == [0, 1]
    assert block.sums[0] == block.sums[1]
    assert int(block.steps) == 1  # the replay leaves the buffers as the one step did
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1")
    assert sorted(finding.params) == ["base_model.model.blocks.1.proj.lora_A.default.weight",
                                      "base_model.model.blocks.1.proj.lora_B.default.weight"]


def test_fires_on_a_forward_hook_that_detaches_a_decoder_layer():
    model = lora()
    layers = model.get_base_model().model.layers
    # a 'feature capture' hook that returns the detached output instead of copying it
    layers[2].register_forward_hook(lambda module, args, out: out.detach() if torch.is_tensor(out)
                                    else (out[0].detach(),) + tuple(out[1:]))
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.2")
    assert any(".layers.0." in p for p in finding.params) and not any(".layers.3." in p for p in finding.params)
    assert report.loss["requires_grad"] is True  # layer 3's adapters still train: a silent break


def test_fires_when_a_layer_with_adapters_runs_under_no_grad():
    model = lora()
    layers = model.get_base_model().model.layers
    layers[0] = NoGradPrefix(layers[0])
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0.inner")
    assert "no_grad" in finding.message and "inside base_model.model.model.layers.0 (NoGradPrefix)" in finding.message
    assert finding.params and all(".layers.0.inner." in p for p in finding.params)


def test_two_layers_each_wrapped_in_no_grad_are_two_cuts():
    """Each of layers 0 and 1 in a wrapper of its own (seen at Phi-3.5-mini size on an H100: the second layer fell
    to grad-missing-unexplained): one graph-break per wrapper, every lost adapter tensor named."""
    model = lora()
    layers = model.get_base_model().model.layers
    for i in (0, 1):
        layers[i] = NoGradPrefix(layers[i])
    report = probe(model, batch(model))
    assert_silent(report, "grad-missing-unexplained")  # checks the coverage invariant too
    got = findings(report, SLUG)
    assert [f.location for f in got] == [f"base_model.model.model.layers.{i}.inner" for i in (0, 1)]
    assert set(got[0].params) | set(got[1].params) == _lora_ids(report, 0, 1)


class InferenceModePrefix(NoGradPrefix):
    def forward(self, *args, **kwargs):
        with torch.inference_mode():
            return self.inner(*args, **kwargs)


def test_fires_when_a_layer_runs_in_inference_mode():
    model = lora()
    layers = model.get_base_model().model.layers
    layers[1] = InferenceModePrefix(layers[1])
    report = probe(model, batch(model))
    assert_fires(report, SLUG, location="base_model.model.model.layers.1.inner")


def test_fires_with_non_reentrant_checkpointing_too():
    """Non-reentrant checkpointing keeps the graph: a cut inside a checkpointed layer is still a cut."""
    model = lora()
    enable_gc(model, reentrant=False)
    model.get_base_model().model.layers[1].register_forward_hook(
        lambda module, args, out: out.detach() if torch.is_tensor(out) else (out[0].detach(),) + tuple(out[1:]))
    report = probe(model, batch(model))
    assert_fires(report, SLUG, location="base_model.model.model.layers.1")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_on_a_detach_with_nothing_trainable_upstream():
    """A stop-gradient in front of a frozen trunk cuts nothing that trains."""
    model = tiny_lm()
    model.blocks[1] = DetachedStream(16)
    model.requires_grad_(False)
    model = custom_lora(model, targets=("blocks.2.proj", "head"))
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert not report.fails("warning")


def test_silent_on_a_frozen_teacher_under_no_grad_in_the_loss():
    """Distillation: the teacher runs under no_grad and holds no trainable parameters."""
    student = lora()
    teacher = lora().eval()
    teacher.requires_grad_(False)

    def loss_fn(model, data):
        with torch.no_grad():
            target = teacher(input_ids=data["input_ids"]).logits.softmax(-1)
        logits = model(input_ids=data["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))

    report = probe(student, batch(student), loss_fn=loss_fn)
    assert_silent(report, SLUG, "loss-detached")
    assert not report.fails("warning")


@pytest.mark.parametrize("gc", [None, "reentrant", "non-reentrant"])
def test_silent_on_a_healthy_lora(gc):
    from peft import get_peft_model

    model = base()
    if gc is not None:
        enable_gc(model, reentrant=gc == "reentrant")
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert all(p.grad in ("ok", "zero") for p in report.snapshot.params if p.requires_grad)


def test_silent_on_a_no_grad_wrapper_around_a_frozen_layer():
    """no_grad around a layer with nothing trainable (LoRA only on the other layers) loses nothing."""
    model = lora(target_modules=r".*layers\.[123]\..*(q_proj|v_proj)")
    layers = model.get_base_model().model.layers
    layers[0] = NoGradPrefix(layers[0])
    report = probe(model, batch(model))
    assert_silent(report, SLUG)


def test_silent_when_the_loss_fn_raises_after_the_forward():
    """An exception is data: the gradients it prevented are not a cut in the graph."""
    model = lora()

    def loss_fn(m, data):
        m(**data)
        raise RuntimeError("the user's loss failed")

    report = probe(model, batch(model), loss_fn=loss_fn)
    assert report.loss["error"] == "RuntimeError: the user's loss failed"
    assert_silent(report, SLUG)
