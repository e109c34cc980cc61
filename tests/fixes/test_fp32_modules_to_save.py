"""fp32-trainable on a half-precision model whose trainable layer is a full Linear: a `modules_to_save` copy of the
head (PEFT's way to train new tokens), or a head unfrozen in place. F.linear refuses a float16 input with float32
weights, so casting the weight alone made the re-probe raise and patch rolled the fix back."""

from __future__ import annotations

import pytest
import torch

import gradflow
from tests.helpers.builders import base, batch, lora
from tests.helpers.patching import ids, patched, train

ANSWER = "half-precision-trainable-params"
COPY = "base_model.model.lm_head.modules_to_save.default.weight"


def _loaded(tmp_path, dtype):
    """A saved fp32 preset loaded back in half precision, as users load a checkpoint."""
    from transformers import AutoModelForCausalLM

    base("tiny-phi3").save_pretrained(str(tmp_path / "fp32"))
    return AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=dtype)


def _head_only(model):
    """A plain model with only its head trainable (no adapters): a linear-probe style fine-tune."""
    model.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)
    return model


# float16 matmuls run on this CPU; bfloat16 is the other half precision users train in
BUILDS = {
    "fp16-base+modules_to_save": lambda tmp_path: lora(base("tiny-phi3", dtype=torch.float16),
                                                       modules_to_save=["lm_head"]),
    "fp16-loaded+modules_to_save": lambda tmp_path: lora(_loaded(tmp_path, torch.float16), modules_to_save=["lm_head"]),
    "modules_to_save-then-half()": lambda tmp_path: lora("tiny-phi3", modules_to_save=["lm_head"]).half(),
    "bf16-base+modules_to_save-embed-and-head": lambda tmp_path: lora(
        base("tiny-phi3", dtype=torch.bfloat16), modules_to_save=["embed_tokens", "lm_head"]),
    "fp16-head-only": lambda tmp_path: _head_only(base("tiny-phi3", dtype=torch.float16)),
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_half_precision_full_layers_are_cast_and_keep_their_gradients(build, tmp_path):
    model = BUILDS[build](tmp_path)
    half = {n for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)}
    assert half, "the setup trains half-precision parameters"
    model_dtype = next(p.dtype for n, p in model.named_parameters() if not p.requires_grad)
    report = patched(model, batch(), fixes=["fp32-trainable"], answers=[ANSWER])
    assert report.extra["rolled_back"] is None
    assert report.before.loss["error"] is None and report.after.loss["error"] is None
    after = report.after.snapshot
    assert all(p.grad in ("ok", "zero") for p in after.params if p.requires_grad)
    assert report.after.params["nonfinite_grad"] == 0
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in half)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {model_dtype}  # the base keeps its dtype
    model.eval()
    with torch.no_grad():
        assert model(**batch()).logits.dtype == model_dtype  # the rest of the model sees what it saw before
    _, unchanged = train(model, batch(), steps=2, lr=1e-2)
    assert not unchanged


def test_the_change_names_the_input_cast():
    model = lora(base("tiny-phi3", dtype=torch.float16), modules_to_save=["lm_head"])
    report = gradflow.patch(model, batch())
    fix = next(f for f in report.fixes_applied if f["id"] == "fp32-trainable")
    assert fix["changed"] == ["1 trainable parameter cast to float32; output dtype kept by a hook on 1 module, "
                              "inputs cast to float32 on 1 leaf module"]
    assert "cast_inputs_float32" in "\n".join(fix["code"])
    hooks = model.get_submodule("base_model.model.lm_head.modules_to_save.default")._forward_pre_hooks.values()
    assert [h.__name__ for h in hooks] == ["cast_inputs_float32"]
    assert model.get_parameter(COPY).dtype == torch.float32


def test_patching_twice_adds_no_second_hook():
    model = lora(base("tiny-phi3", dtype=torch.float16), modules_to_save=["lm_head"])
    gradflow.patch(model, batch())
    report = gradflow.patch(model, batch())
    assert "fp32-trainable" not in ids(report)
    copy = model.get_submodule("base_model.model.lm_head.modules_to_save.default")
    assert len(copy._forward_pre_hooks) == 1 and len(copy._forward_hooks) == 1


# --- stays silent -------------------------------------------------------------------------------------------------
def test_a_healthy_fp32_model_gets_no_fp32_fix():
    model = lora("tiny-phi3", modules_to_save=["lm_head"])
    report = gradflow.patch(model, batch())
    assert ANSWER not in report.before.slugs()
    assert "fp32-trainable" not in ids(report)
    copy = model.get_submodule("base_model.model.lm_head.modules_to_save.default")
    assert not copy._forward_pre_hooks and not copy._forward_hooks
    assert not report.fails("warning")


def test_adapters_autocast_to_fp32_on_a_half_base_need_no_fix():
    """PEFT keeps LoRA weights in fp32 on a half-precision base by default: nothing to cast."""
    model = lora(base("tiny-phi3", dtype=torch.float16))
    report = gradflow.patch(model, batch())
    assert ANSWER not in report.before.slugs() and "fp32-trainable" not in ids(report)
