"""Adapters that are not inside a PeftModel count as adapters for every rule and for patch.

transformers' own PEFT integration (`load_adapter`, `add_adapter`, `from_pretrained` of an adapter directory)
and `peft.inject_adapter_in_model` put LoRA layers into a plain model. gradflow finds them by PEFT's tuner layers.
"""

from __future__ import annotations

import pytest
import torch

import gradflow
from tests.helpers.builders import STACK, assert_fires, assert_healthy, assert_silent, base, batch, lora_config, probe

FIRST = "model.layers.0.self_attn.q_proj.lora_A.default"


@pytest.fixture
def adapter_dir(preset_dir, tmp_path):
    """A LoRA adapter saved over a local tiny-llama directory (adapter_config.json names it as the base)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = preset_dir("tiny-llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), lora_config())
    model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def _base(preset_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(preset_dir("tiny-llama")))


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def _assert_frozen_adapter(model, report, fix_words: str):
    """adapter-frozen over all the LoRA weights of a plain transformers model, with a safe fix."""
    names = _lora_params(model)
    assert names and not any(p.requires_grad for p in names.values())
    finding = assert_fires(report, "adapter-frozen", location=FIRST)
    assert finding.message.startswith("all adapter weights of default are frozen")
    assert sorted(finding.params) == sorted(names)
    assert finding.fix.applicability == "safe" and fix_words in finding.fix.title
    assert_silent(report, "no-trainable-parameters")  # what these models reported before
    snap = report.snapshot
    assert snap.is_peft and snap.adapter_names == ("default",)


# --- frozen: adapter-frozen, whichever way the adapter got in ---------------------------------------------------------
def test_load_adapter_is_frozen(preset_dir, adapter_dir):
    """transformers' load_adapter defaults to is_trainable=False: the LoRA weights come in frozen (both stacks)."""
    model = _base(preset_dir)
    model.load_adapter(str(adapter_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and model._hf_peft_config_loaded
    report = probe(model, batch(model))
    _assert_frozen_adapter(model, report, "load_adapter(..., is_trainable=True)")
    assert report.snapshot.adapter_source == "transformers"


def test_from_pretrained_of_an_adapter_dir_is_frozen(adapter_dir):
    """AutoModelForCausalLM.from_pretrained(adapter dir) loads the base it names, then the adapter, frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(adapter_dir))
    assert not hasattr(model, "get_base_model")  # a transformers model, no PeftModel wrapper
    report = gradflow.inspect(model, static=True)  # found before any forward
    _assert_frozen_adapter(model, report, "load_adapter")


def test_inject_adapter_in_model_then_frozen():
    """peft.inject_adapter_in_model returns the model itself with LoRA layers; a later requires_grad_(False)."""
    from peft import inject_adapter_in_model

    model = base()
    assert inject_adapter_in_model(lora_config(), model) is model
    model.requires_grad_(False)
    report = probe(model, batch(model))
    _assert_frozen_adapter(model, report, "inject_adapter_in_model")
    assert report.snapshot.adapter_source == "injected"


def test_add_adapter_then_frozen():
    """add_adapter(LoraConfig) is trainable; freezing 'the base' afterwards freezes it. transformers 5.x refuses
    add_adapter with PEFT < 0.22 (the 0.21 of that stack)."""
    model = base()
    if STACK == "new":
        with pytest.raises(ValueError, match="0.22"):
            model.add_adapter(lora_config())
        return
    model.add_adapter(lora_config())
    model.requires_grad_(False)
    _assert_frozen_adapter(model, probe(model, batch(model)), "load_adapter")


def test_loaded_adapter_beside_a_trainable_head(preset_dir, adapter_dir, tmp_path):
    """A trainable lm_head beside a trainable loaded adapter: costly, and transformers' save_pretrained (adapter
    weights only) drops it."""
    model = _base(preset_dir)
    model.load_adapter(str(adapter_dir), is_trainable=True)
    model.lm_head.weight.requires_grad_(True)
    report = probe(model, batch(model))
    assert_fires(report, "trainable-embeddings-costly", location="lm_head")
    assert_fires(report, "trainable-param-not-saved", location="lm_head")
    assert_silent(report, "adapter-frozen")
    if STACK == "old":  # what save_pretrained writes: the adapter only (5.x needs PEFT >= 0.22 to save at all)
        from safetensors.torch import load_file

        model.save_pretrained(str(tmp_path / "saved"))
        keys = load_file(str(tmp_path / "saved" / "adapter_model.safetensors")).keys()
        assert keys and all(".lora_" in k for k in keys)


def test_patch_unfreezes_a_loaded_adapter(preset_dir, adapter_dir):
    """gradflow.patch unfreezes what load_adapter froze, and the re-probe shows every LoRA weight getting a gradient."""
    model = _base(preset_dir)
    model.load_adapter(str(adapter_dir))
    report = gradflow.patch(model, batch(model))
    assert [f["id"] for f in report.fixes_applied] == ["unfreeze-adapter"]
    assert all(p.requires_grad for p in _lora_params(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert model.peft_config["default"].inference_mode is False
    assert_healthy(report.after)
    assert report.after.params["trainable"] == len(_lora_params(model))
    # and an optimizer step really moves lora_B
    lora_b = next(p for n, p in model.named_parameters() if ".lora_B." in n)
    before = lora_b.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch(model)).loss.backward()
    optimizer.step()
    assert not torch.equal(before, lora_b.detach())


def test_patch_unfreezes_an_injected_adapter():
    from peft import inject_adapter_in_model

    model = base()
    inject_adapter_in_model(lora_config(), model)
    model.requires_grad_(False)
    report = gradflow.patch(model, batch(model))
    assert [f["id"] for f in report.fixes_applied] == ["unfreeze-adapter"]
    assert all(p.requires_grad for p in _lora_params(model).values())
    assert_healthy(report.after)


# --- trainable: no error, no warning ----------------------------------------------------------------------------------
def test_silent_load_adapter_trainable(preset_dir, adapter_dir):
    model = _base(preset_dir)
    model.load_adapter(str(adapter_dir), is_trainable=True)
    report = probe(model, batch(model))
    assert_healthy(report)
    assert report.snapshot.is_peft and report.snapshot.adapter_source == "transformers"
    assert_fires(report, "lora-zero-init", location=FIRST)  # the adapter rules see these weights as LoRA


def test_silent_inject_adapter_in_model():
    """inject_adapter_in_model freezes the base and leaves the LoRA weights trainable; saving is the user's own
    code, so nothing is reported as unsaved."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config(), base())
    model.model.norm.weight.requires_grad_(True)  # a user's extra trainable: no save_pretrained to lose it
    report = probe(model, batch(model))
    assert_healthy(report)
    assert [p.adapter for p in report.snapshot.params if ".lora_" in p.name] == [True] * len(_lora_params(model))
    assert all(p.saved is None for p in report.snapshot.params)


def test_silent_add_adapter():
    model = base()
    if STACK == "new":
        pytest.skip("transformers 5.x add_adapter needs PEFT >= 0.22 (see test_add_adapter_then_frozen)")
    model.add_adapter(lora_config())
    report = probe(model, batch(model))
    assert_healthy(report)
    assert report.snapshot.adapter_source == "transformers"


def test_silent_plain_model_has_no_adapters():
    snap = gradflow.inspect(base(), static=True).snapshot
    assert not snap.is_peft and snap.adapter_source is None and not any(p.adapter for p in snap.params)
