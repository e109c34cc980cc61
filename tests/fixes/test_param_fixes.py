"""Frozen adapters, frozen intended parameters, unsaved trainables, half-precision trainables, cache, k-bit, embeddings."""

from __future__ import annotations

import torch

import gradflow
from tests.helpers.builders import base, batch, enable_gc, lora, remove_input_grad_hooks, rotated_base, seed_order
from tests.helpers.patching import ids, patched, train


def _reload(tmp_path, onto, *, is_trainable=False):
    from peft import PeftModel

    lora("tiny-phi3").save_pretrained(str(tmp_path / "adapter"))
    return PeftModel.from_pretrained(onto, str(tmp_path / "adapter"), is_trainable=is_trainable)


# --- adapters ------------------------------------------------------------------------------------------------------
def test_reloaded_adapter_without_is_trainable_is_unfrozen(tmp_path):
    model = _reload(tmp_path, base("tiny-phi3"))
    report = patched(model, batch(), fixes=["unfreeze-adapter"], answers=["adapter-frozen"])
    assert model.peft_config["default"].inference_mode is False
    assert report.after.params["trainable"] == 32
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_adapter_frozen_by_hand_is_unfrozen():
    model = lora("tiny-phi3")
    model.requires_grad_(False)
    patched(model, batch(), fixes=["unfreeze-adapter"], answers=["adapter-frozen"])


def test_unfrozen_adapter_behind_a_cut_checkpoint_gets_the_hook_in_a_second_round(tmp_path):
    model = remove_input_grad_hooks(_reload(tmp_path, enable_gc(base("tiny-phi3"))))
    report = patched(model, batch(), fixes=["unfreeze-adapter", "input-grad-hook"], answers=["adapter-frozen"])
    rounds = {f["id"]: f["round"] for f in report.fixes_applied}
    # the cut only shows once something inside the checkpointed layers is trainable again
    assert "reentrant-checkpoint-no-input-grad" not in report.before.slugs()
    assert rounds["unfreeze-adapter"] == 1 and rounds["input-grad-hook"] == 2


# --- intended parameters and modules_to_save ------------------------------------------------------------------------
def _thetas(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("theta") and "original_module" not in n}


def test_frozen_rotations_move_into_modules_to_save_and_survive_a_round_trip(tmp_path):
    from peft import PeftModel

    model = lora(rotated_base(), target_modules=["qkv_proj"])
    regex = r"lora_|theta"
    report = patched(model, batch(), fixes=["unfreeze-intended"], answers=["intended-param-frozen"], regex=regex)
    assert report.fixes_applied[0]["data"]["modules_to_save"] == [
        "model.layers.1.self_attn.o_proj.rot", "model.layers.2.self_attn.o_proj.rot"]
    assert "trainable-param-not-saved" not in report.after.slugs()
    thetas = _thetas(model)
    assert len(thetas) == 2 and all(p.requires_grad for p in thetas.values())
    losses, unchanged = train(model, batch(), steps=3, regex=regex)
    assert not unchanged
    model.save_pretrained(str(tmp_path / "out"))
    reloaded = PeftModel.from_pretrained(rotated_base(), str(tmp_path / "out"), is_trainable=True)
    again = _thetas(reloaded)
    assert sorted(again) == sorted(thetas)
    for name, p in thetas.items():
        assert p.abs().sum() > 0
        torch.testing.assert_close(again[name], p.detach(), rtol=0, atol=0)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(**batch()).logits, model(**batch()).logits, rtol=1e-5, atol=1e-5)


def test_rotations_unfrozen_by_hand_are_made_saveable():
    model = lora(rotated_base(layers=(0,)), target_modules=["qkv_proj"])
    for p in _thetas(model).values():
        p.requires_grad_(True)
    report = patched(model, batch(), fixes=["modules-to-save"], answers=["trainable-param-not-saved"])
    assert model.peft_config["default"].modules_to_save == ["model.layers.0.self_attn.o_proj.rot"]
    assert "modules_to_save" in "\n".join(report.fixes_applied[0]["code"])


def test_intended_parameters_of_a_plain_model_are_unfrozen_in_place():
    model = base("tiny-llama")
    model.requires_grad_(False)
    report = patched(model, batch(), fixes=["unfreeze-intended"], answers=["intended-param-frozen"], regex=r"norm")
    assert report.after.params["trainable"] == 9
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "norm" in n}


# --- dtype -----------------------------------------------------------------------------------------------------------
def test_bf16_adapters_are_cast_to_fp32():
    model = lora(base("tiny-phi3", dtype=torch.bfloat16), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    patched(model, batch(), fixes=["fp32-trainable"], answers=["half-precision-trainable-params"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base stays


def test_bf16_norms_cast_to_fp32_keep_the_base_dtype_around_them():
    model = base("tiny-llama", dtype=torch.bfloat16)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.requires_grad_(True)
    report = patched(model, batch(), fixes=["fp32-trainable"], answers=["half-precision-trainable-params"])
    assert "hook on 9 modules" in report.fixes_applied[0]["changed"][0]
    out = model(**batch())
    assert out.logits.dtype == torch.bfloat16


# --- cache -------------------------------------------------------------------------------------------------------------
def test_use_cache_is_turned_off_for_training():
    model = enable_gc(lora("tiny-phi3"), reentrant=False)
    assert model.config.use_cache is True
    patched(model, batch(), fixes=["cache-off"], answers=["use-cache-in-training"])
    assert model.config.use_cache is False


def test_legacy_past_key_values_are_dropped_from_the_batch():
    data = batch()
    with torch.no_grad():
        cache = base("tiny-phi3")(input_ids=data["input_ids"], use_cache=True).past_key_values
    legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else tuple(
        (layer.keys, layer.values) for layer in cache.layers)
    data["past_key_values"] = legacy
    model = lora("tiny-phi3")
    report = gradflow.patch(model, data)
    assert report.before.loss["error"] is not None  # a legacy tuple breaks the training forward
    assert "cache-off" in ids(report)
    assert "past_key_values" not in data
    assert report.after.loss["error"] is None and report.extra["verification"]["ok"]
    assert "batch.pop('past_key_values', None)" in report.extra["snippet"]


# --- quantized base ----------------------------------------------------------------------------------------------------
def test_unprepared_4bit_base_gets_fp32_norms_and_the_hook(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base("tiny-phi3").save_pretrained(str(tmp_path / "fp"))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), quantization_config=quant, dtype=torch.bfloat16,
                                             device_map={"": "cpu"})
    model = remove_input_grad_hooks(lora(remove_input_grad_hooks(enable_gc(q))))
    report = patched(model, batch(), fixes=["kbit-prepare", "input-grad-hook"],
                     answers=["kbit-not-prepared", "reentrant-checkpoint-no-input-grad"])
    hook = next(f for f in report.fixes_applied if f["id"] == "input-grad-hook")
    assert set(hook["answers"]) == {"kbit-not-prepared", "reentrant-checkpoint-no-input-grad"}  # one hook for both
    assert not [n for n, p in model.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)]


# --- costly embeddings (unsafe) -----------------------------------------------------------------------------------------
def _embedding_workaround():
    model = seed_order()
    model.get_input_embeddings().weight.requires_grad_(True)  # the seed's workaround
    return model


def test_costly_embeddings_are_left_alone_without_unsafe():
    model = _embedding_workaround()
    report = gradflow.patch(model, batch())
    assert "refreeze-embeddings" not in ids(report)
    assert "modules-to-save" not in ids(report)  # a safe fix does not double an embedding's memory
    assert "trainable-embeddings-costly" in report.after.slugs()
    assert model.get_input_embeddings().weight.requires_grad is True
    skipped = [s for s in report.extra["skipped_unsafe"] if s["id"] == "refreeze-embeddings"]
    assert skipped and "32,768 parameters" in skipped[0]["changes"][0]
    assert "# unsafe, not applied" in report.extra["snippet"]


def test_costly_embeddings_are_refrozen_with_the_hook_under_unsafe():
    model = _embedding_workaround()
    report = patched(model, batch(), fixes=["refreeze-embeddings", "input-grad-hook"],
                     answers=["trainable-embeddings-costly"], unsafe=True)
    refreeze = next(f for f in report.fixes_applied if f["id"] == "refreeze-embeddings")
    assert refreeze["applicability"] == "unsafe"
    assert "32,768 parameters" in refreeze["planned"][0] and "KiB" in refreeze["planned"][0]
    assert "modules-to-save" not in ids(report)  # not copied into the adapter only to be frozen
    assert model.get_input_embeddings().weight.requires_grad is False
    assert report.after.params["trainable"] == 32


def _head_by_hand(model):
    model.get_output_embeddings().weight.requires_grad_(True)
    return model


def test_a_costly_head_is_refrozen_without_the_input_grad_hook():
    """A trainable head is not the reentrant workaround: freezing it needs no hook (nothing checkpointed after it)."""
    model = _head_by_hand(lora("tiny-phi3"))
    report = patched(model, batch(), fixes=["refreeze-embeddings"], answers=["trainable-embeddings-costly"],
                     unsafe=True)
    assert ids(report) == ["refreeze-embeddings"]
    refreeze = report.fixes_applied[0]
    assert "hook" not in refreeze["why"] and "hook" not in "\n".join(refreeze["code"])
    assert model.get_output_embeddings().weight.requires_grad is False


def test_a_costly_head_under_reentrant_checkpointing_gets_no_hook_for_itself():
    """The seed's reentrant setup: the hook answers the cut regions, never the head."""
    model = _head_by_hand(seed_order())
    report = gradflow.patch(model, batch(), unsafe=True, dry_run=True)
    plans = {p["id"]: p for p in report.extra["plan"]}
    assert "hook" not in plans["refreeze-embeddings"]["why"]
    assert plans["input-grad-hook"]["answers"] == ["reentrant-checkpoint-no-input-grad"]
    title = next(f.fix.title for f in report.before.findings if f.slug == "trainable-embeddings-costly")
    assert "hook" not in title


def test_modules_to_save_copies_are_not_refrozen_under_unsafe():
    """modules_to_save is the user's choice (info): no fix touches it, even with --unsafe-fixes."""
    model = lora("tiny-phi3", modules_to_save=["embed_tokens", "lm_head"])
    report = gradflow.patch(model, batch(), unsafe=True)
    assert "refreeze-embeddings" not in ids(report)
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert len(copies) == 2 and all(p.requires_grad for p in copies)
    assert not report.after.fails("warning")
