"""graph-break: a module whose output no longer depends on its input or parameters through autograd."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.builders import (Block, DetachedBranch, TinyLM, assert_fires, assert_silent, base, batch,
                                    custom_lora, custom_with, enable_gc, findings, lora, lora_config, probe,
                                    tiny_batch, tiny_lm)
from tests.helpers.vlm import VISION_LORA, tiny_llava, vlm_batch

SLUG = "graph-break"


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


class NoGradPrefix(torch.nn.Module):
    """A user's wrapper that runs a decoder layer under torch.no_grad to 'save memory on the lower layers'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.inner(*args, **kwargs)


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


# --- torch.no_grad: the module that ran without autograd is the location ----------------------------------------------
class Smoother(torch.nn.Module):
    """A frozen normalisation whose forward is decorated with @torch.no_grad() ('it is frozen anyway')."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)

    @torch.no_grad()
    def forward(self, x):
        return self.norm(x)


class Rescale(torch.nn.Module):
    """A frozen per-channel scale with no children, its forward decorated with @torch.no_grad()."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def forward(self, x):
        return x * self.scale


class ThenPost(torch.nn.Module):
    """Runs `inner` (a block or a LoRA'd decoder layer), then passes its hidden states through `post`."""

    def __init__(self, inner, post):
        super().__init__()
        self.inner = inner
        self.post = post

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inner(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.post(out[0]),) + tuple(out[1:])
        return self.post(out)


def _lora_ids(report, *layers):
    return {p.name for p in report.snapshot.params
            if p.requires_grad and any(f".layers.{i}." in p.name for i in layers)}


@pytest.mark.parametrize("post", [Smoother, Rescale])
def test_fires_at_a_custom_module_whose_forward_is_decorated_with_no_grad(post):
    model = tiny_lm()
    model.blocks[1] = ThenPost(model.blocks[1], post(16))
    model.requires_grad_(False)
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    assert report.loss["requires_grad"] is True  # block 2's adapters still train: a silent break
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1.post")
    assert "@torch.no_grad()" in finding.message and post.__name__ in finding.message
    # block 0 upstream and block 1 before the decorated module: all lost at it
    assert {n.split(".proj.")[0] for n in finding.params} == {"base_model.model.blocks.0",
                                                               "base_model.model.blocks.1.inner"}
    assert_silent(report, "loss-detached", "trainable-param-unused")


@pytest.mark.parametrize("post", [Smoother, Rescale])
def test_fires_at_a_no_grad_adapter_after_a_lora_decoder_layer(post):
    model = lora()
    layers = model.get_base_model().model.layers
    layers[1] = ThenPost(layers[1], post(64).requires_grad_(False))
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1.post")
    assert "no_grad" in finding.message
    assert set(finding.params) == _lora_ids(report, 0, 1)
    grads = {p.name: p.grad for p in report.snapshot.params if p.requires_grad}
    assert all(grads[n] in ("ok", "zero") for n in _lora_ids(report, 2, 3))


class NoGradLayerLM(TinyLM):
    """A user's forward that runs block 1 under `with torch.no_grad():` ('it is frozen anyway')."""

    def hidden(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if i == 1:
                with torch.no_grad():
                    h = block(h)
            else:
                h = block(h)
        return h


@pytest.mark.parametrize("targets", [("proj",), ("blocks.0.proj", "blocks.2.proj")], ids=["lora-inside", "frozen"])
def test_fires_at_a_block_the_users_forward_runs_under_no_grad(targets):
    model = NoGradLayerLM()
    model.requires_grad_(False)
    model = custom_lora(model, targets=targets)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1")
    assert "torch.no_grad" in finding.message and "inside base_model.model (NoGradLayerLM)" in finding.message
    # the parameters before the no_grad call are lost there too, not only those inside it
    assert {n.split(".proj.")[0] for n in finding.params} == (
        {"base_model.model.blocks.0", "base_model.model.blocks.1"} if len(targets) == 1 else {"base_model.model.blocks.0"})


def _loop_with_layer_under_no_grad(index):
    """A user's loss function that runs the decoder layers itself and wraps one call (or a set) in torch.no_grad()."""
    scope = index if isinstance(index, set) else {index}

    def loss_fn(model, data):
        inner = model.get_base_model()
        h = inner.model.embed_tokens(data["input_ids"])
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rope = inner.model.rotary_emb(h, positions)
        for i, layer in enumerate(inner.model.layers):
            with torch.no_grad() if i in scope else torch.enable_grad():
                out = layer(h, position_embeddings=rope, position_ids=positions)
            h = out[0] if isinstance(out, tuple) else out
        logits = inner.lm_head(inner.model.norm(h))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten())

    return loss_fn


@pytest.mark.parametrize("targets", ["all-linear", r".*layers\.[023]\..*(q_proj|v_proj)"], ids=["lora-inside", "frozen"])
def test_fires_at_a_decoder_layer_a_user_loop_runs_under_no_grad(targets):
    model = lora(target_modules=targets)
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad(1))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1")
    assert "torch.no_grad" in finding.message
    assert set(finding.params) == _lora_ids(report, 0, 1)
    assert report.loss["requires_grad"] is True


def test_silent_on_a_no_grad_module_with_nothing_trainable_before_it():
    """@torch.no_grad() on a frozen module in front of everything that trains cuts nothing that learns."""
    model = tiny_lm()
    model.blocks[0] = ThenPost(model.blocks[0], Smoother(16))
    model.requires_grad_(False)
    model = custom_lora(model, targets=("blocks.1.proj", "blocks.2.proj"))
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert not report.fails("warning")


def test_silent_on_a_user_loop_that_runs_a_frozen_first_layer_under_no_grad():
    model = lora(target_modules=r".*layers\.[123]\..*(q_proj|v_proj)")
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad(0))
    assert_silent(report, SLUG)
    assert not report.fails("warning")


def test_patch_advice_says_which_no_grad_to_remove():
    """Display-only advice: the decorator on the module's own forward, or the caller's no_grad block."""
    import gradflow

    model = tiny_lm()
    model.blocks[1] = ThenPost(model.blocks[1], Rescale(16))
    model.requires_grad_(False)
    report = gradflow.patch(custom_lora(model), tiny_batch())
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["changes"][0].startswith("in base_model.model.blocks.1.post (Rescale, forward at ")
    assert advice["changes"][0].endswith("remove the @torch.no_grad() decorator from forward")

    model = NoGradLayerLM()
    model.requires_grad_(False)
    report = gradflow.patch(custom_lora(model), tiny_batch())
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["changes"][0].startswith("in base_model.model (NoGradLayerLM")
    assert advice["changes"][0].endswith("call base_model.model.blocks.1 outside torch.no_grad() / inference_mode")


# --- the scope and the sub-model are named (issue 18) -------------------------------------------------------------
def test_fires_on_a_no_grad_block_around_two_layers_with_every_lost_tensor():
    """`with torch.no_grad():` around layers 0-1 in a user's loop: all their adapters are lost, named as one scope."""
    model = lora(target_modules=["q_proj", "k_proj", "v_proj"])
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad({0, 1}))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0")
    assert set(finding.params) == _lora_ids(report, 0, 1) and len(finding.params) == 12
    assert "base_model.model.model.layers.0–1" in finding.message


def test_fires_at_the_vision_tower_a_vlm_runs_under_no_grad():
    """get_image_features wrapped in torch.no_grad() (as for a frozen tower) while LoRA on the tower should train."""
    model = lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA)
    inner = model.get_base_model()
    inner.model.get_image_features = torch.no_grad()(inner.model.get_image_features)
    report = probe(model, vlm_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.model.vision_tower")
    assert finding.params and all(".vision_tower." in p for p in finding.params)
    assert_silent(report, "grad-missing-unexplained", "trainable-param-unused")
