"""The patch engine: dry runs change nothing, a second patch changes nothing, harm is rolled back, advice names places."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradflow
from tests.helpers.builders import base, batch, enable_gc, lora, remove_input_grad_hooks, rotated_base, seed_order
from tests.helpers.patching import assert_same, fingerprint, ids

REGEX = r"lora_|theta"


def _many_faults():
    """Cut checkpoints, frozen rotations, bf16 adapters and the cache, in one model."""
    model = lora(rotated_base(dtype=torch.bfloat16), target_modules=["qkv_proj", "gate_up_proj"],
                 autocast_adapter_dtype=False)
    return remove_input_grad_hooks(enable_gc(model))


def test_dry_run_leaves_the_model_bit_identical_and_shows_the_plan():
    model, data = _many_faults(), batch()
    kept = dict(data)
    before = fingerprint(model)
    report = gradflow.patch(model, data, trainable=REGEX, dry_run=True)
    assert_same(before, fingerprint(model))
    assert data.keys() == kept.keys()
    assert report.after is None and report.fixes_applied == []
    planned = [p["id"] for p in report.extra["plan"]]
    assert {"unfreeze-intended", "fp32-trainable", "input-grad-hook", "cache-off"} <= set(planned)
    assert all(p["changes"] and p["why"] for p in report.extra["plan"])
    assert report.findings == report.before.findings and report.fails("error")
    data_out = report.to_dict()
    assert data_out["after"] is None and data_out["dry_run"] is True
    assert [p["id"] for p in json.loads(json.dumps(data_out))["plan"]] == planned


def test_patch_fixes_everything_then_a_second_patch_changes_nothing():
    model, data = _many_faults(), batch()
    first = gradflow.patch(model, data, trainable=REGEX)
    assert {"unfreeze-intended", "fp32-trainable", "input-grad-hook", "cache-off"} <= set(ids(first))
    assert first.extra["verification"]["ok"] and not first.fails("warning")
    after_first = fingerprint(model)
    second = gradflow.patch(model, data, trainable=REGEX)
    assert second.fixes_applied == []
    assert second.extra["snippet"] == ""
    assert second.before.slugs() == second.after.slugs() == first.after.slugs()
    assert_same(after_first, fingerprint(model))


class _Gate(nn.Module):
    """A user's module that multiplies by its own weight with F.linear: it needs input and weight in one dtype."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.eye(dim))
        # a child: fp32-trainable then casts only the outputs, so its own F.linear sees mixed dtypes
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(nn.functional.linear(x, self.w))


class _Gated(nn.Module):
    def __init__(self, inner, dim):
        super().__init__()
        self.inner = inner
        self.gate = _Gate(dim)

    def forward(self, x):
        return self.inner(self.gate(x))


def _gated(dtype=torch.bfloat16):
    model = base("tiny-phi3", dtype=dtype)
    attn = model.model.layers[0].self_attn
    attn.o_proj = _Gated(attn.o_proj, 64).to(dtype)
    return model


def test_a_fix_that_breaks_the_forward_is_rolled_back_exactly():
    model = _gated()
    model.requires_grad_(False)
    model.model.layers[0].self_attn.o_proj.gate.w.requires_grad_(True)
    before = fingerprint(model)
    report = gradflow.patch(model, batch())
    assert report.fixes_applied == []
    dropped = report.extra["rolled_back"]["fixes"]
    assert [f["id"] for f in dropped] == ["fp32-trainable"]
    assert "dtype" in dropped[0]["reason"]
    assert_same(before, fingerprint(model))
    assert report.after.loss["error"] is None and report.extra["verification"]["ok"]


def test_only_the_harmful_fix_is_dropped():
    model = lora(_gated(), target_modules=["qkv_proj"])
    model.get_submodule("base_model.model.model.layers.0.self_attn.o_proj.gate").w.requires_grad_(True)
    report = gradflow.patch(model, batch())
    assert ids(report) == ["modules-to-save"]
    assert [f["id"] for f in report.extra["rolled_back"]["fixes"]] == ["fp32-trainable"]
    assert "trainable-param-not-saved" not in report.after.slugs()
    assert "half-precision-trainable-params" in report.after.slugs()
    assert model(**batch()).loss.requires_grad


# --- display-only: user-code causes -------------------------------------------------------------------------------
class _Detach(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach()


class _Sqrt0(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.inner(x) * torch.sqrt(self.g - self.g)  # d/dg sqrt(0) = inf


def _detached_loss(model, data):
    logits = model(**data).logits.detach()
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data["labels"][:, 1:].reshape(-1))
    return loss.requires_grad_()


def _fault(kind):
    model, data, kwargs = lora("tiny-phi3"), batch(), {}
    inner = model.get_base_model().model
    if kind == "graph-break":
        inner.layers[1].mlp = _Detach(inner.layers[1].mlp)
        where = "base_model.model.model.layers.1.mlp"
    elif kind == "loss-detached":
        kwargs["loss_fn"], where = _detached_loss, None
    elif kind == "param-not-in-optimizer":
        kwargs["optimizer"] = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n])
        where = None
    elif kind == "no-supervised-tokens":
        data["labels"][:] = -100
        where = None
    elif kind == "nonfinite-grad":
        inner.layers[2].mlp = _Sqrt0(inner.layers[2].mlp)
        inner.layers[2].mlp.g.requires_grad_(True)
        kwargs["trainable"], where = r"lora_|\.g$", "base_model.model.model.layers.2.mlp"
    else:  # trainable-param-unused
        model.get_base_model().extra_head = nn.Linear(64, 64)
        where = "base_model.model.extra_head"
    return model, data, kwargs, where


@pytest.mark.parametrize("slug", ["graph-break", "loss-detached", "param-not-in-optimizer", "no-supervised-tokens",
                                  "nonfinite-grad", "trainable-param-unused"])
def test_user_code_causes_are_display_only_and_name_the_place(slug):
    model, data, kwargs, where = _fault(slug)
    report = gradflow.patch(model, data, **kwargs)
    assert slug in report.before.slugs()
    assert slug in report.after.slugs()  # nothing gradflow may change answers it
    assert not [f for f in report.fixes_applied if slug in f["answers"]]
    advice = [a for a in report.extra["advice"] if slug in a["answers"]]
    assert len(advice) == 1 and advice[0]["applicability"] == "display-only"
    text = advice[0]["changes"][0]
    if where is not None:
        assert where in text, text
    if slug in ("graph-break", "nonfinite-grad"):  # the user's own module: its file and line too
        assert "test_engine.py:" in text, text
    if slug == "loss-detached":
        assert "_detached_loss" in text and "test_engine.py:" in text
    assert f"# {slug}:" in report.extra["snippet"]
    assert report.fails("warning")


def test_every_fix_declares_its_safety_and_answers_real_findings():
    from gradflow.fixes import all_fixes, fixes_for
    from gradflow.fixes._base import APPLICABILITIES
    from gradflow.rules import all_rules
    from gradflow.rules.codes import SLUGS

    fixes = all_fixes()
    assert len({f.id for f in fixes}) == len(fixes)
    for fix in fixes:
        assert fix.applicability in APPLICABILITIES, fix.id
        assert fix.answers and set(fix.answers) <= set(SLUGS), fix.id
        assert "## What it does" in fix.doc and "## Fix safety" in fix.doc, fix.id
        assert fix.doc.split("## Fix safety")[1].split()[0].lower().rstrip(":.") == fix.applicability, fix.id
        assert (fix.apply is None) == (fix.applicability == "display-only"), fix.id
    for rule in all_rules():
        if rule.severity != "info" and not rule.runtime:  # runtime findings stop a training run; patch never sees them
            assert fixes_for(rule.slug) or rule.slug == "no-trainable-parameters", rule.slug


def test_report_json_carries_before_after_and_fixes():
    model = seed_order()
    report = gradflow.patch(model, batch())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["command"] == "patch"
    assert data["before"]["command"] == data["after"]["command"] == "probe-backward"
    assert data["before"]["params"]["with_grad"] == 0 and data["after"]["params"]["with_grad"] == 32
    assert data["after"]["loss"]["grad_fn"] and data["before"]["loss"]["grad_fn"] is None
    fix = data["fixes_applied"][0]
    assert {"id", "title", "applicability", "answers", "changed", "why", "verified", "data", "code"} <= set(fix)
    assert data["findings"] == data["after"]["findings"]
    assert data["verification"]["ok"] is True
