"""gradflow.testing.assert_gradient_flow: passes on healthy setups, fails readably on broken ones (Trainers too)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from gradflow.errors import GradflowError
from gradflow.setup.presets import build_preset
from gradflow.testing import assert_gradient_flow
from tests.helpers.builders import batch, lora

REALISTIC = Path(__file__).resolve().parent / "realistic"
LAYER0 = "base_model.model.model.layers.0"


def script(name):
    spec = importlib.util.spec_from_file_location(f"_realistic_{name}", REALISTIC / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failure(*args, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        assert_gradient_flow(*args, **kwargs)
    return str(info.value)


# ----- healthy -------------------------------------------------------------------------------------------------
def test_passes_on_tiny_phi3_with_lora_and_returns_the_report():
    model = lora("tiny-phi3")
    report = assert_gradient_flow(model, trainable="lora_")
    assert report.command == "probe-backward" and not report.fails("error")
    assert report.params["none_grad"] == 0 and report.params["trainable"] == report.params["with_grad"] > 0
    assert all(p.grad is None for p in model.parameters())  # the model is left as found


def test_passes_with_non_reentrant_checkpointing_and_a_batch():
    model = lora("tiny-llama")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_gradient_flow(model, batch(seed=1), "lora_", fail_on="warning")


def test_passes_on_a_healthy_sft_trainer(tmp_path):
    trainer = script("sft_lora").build(str(tmp_path))  # TRL SFTTrainer with a peft_config and checkpointing
    report = assert_gradient_flow(trainer, trainable="lora_")
    assert report.params["none_grad"] == 0


# ----- broken --------------------------------------------------------------------------------------------------
def test_fails_readably_on_a_frozen_adapter():
    model = lora("tiny-llama")
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
    text = failure(model, trainable="lora_")
    lines = text.splitlines()
    assert lines[0] == ("gradflow: 1 finding at or above 'error' in PeftModelForCausalLM (loss grad_fn none; "
                        "trainable tensors 0: 0 ok, 0 none, 0 zero, 0 non-finite)")
    # one block: severity code slug at module / message / fix (applicability): title
    lora_a = rf"{LAYER0}\.self_attn\.q_proj\.lora_A\.default"
    assert re.fullmatch(rf"  error GF\d{{3}} adapter-frozen at {lora_a}", lines[1]), lines[1]
    code = lines[1].split()[1]
    assert lines[2].startswith("      all adapter weights of default are frozen (56 parameters")
    assert lines[3] == "      fix (safe): Unfreeze the adapter (PeftModel.from_pretrained(..., is_trainable=True))"
    assert lines[4:] == [f"  more: gradflow explain {code}"]
    assert "\x1b[" not in text  # plain text: CI logs show no escape codes


def test_fails_readably_on_a_reloaded_adapter_without_is_trainable(tmp_path):
    """PeftModel.from_pretrained without is_trainable=True: adapter-frozen, with its fix."""
    lora("tiny-llama").save_pretrained(str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(build_preset("tiny-llama", seed=0), str(tmp_path / "adapter"))
    text = failure(model)
    assert "adapter-frozen" in text and "is_trainable=True" in text
    lines = text.splitlines()
    block = next(i for i, line in enumerate(lines) if "adapter-frozen" in line)
    assert re.fullmatch(rf"  error GF\d{{3}} adapter-frozen at {LAYER0}\.\S+", lines[block])  # the module it concerns
    assert lines[block + 1].startswith("      all adapter weights") and lines[block + 2].startswith("      fix (safe):")


def test_fails_on_reentrant_checkpointing_without_input_grads_given_a_factory_dict():
    from gradflow.demos import seed_bug

    setup = seed_bug()  # {"model", "batch", "tokenizer"}: LoRA before reentrant checkpointing, no input-grad hook
    text = failure(setup)
    assert re.search(rf"^  error GF\d{{3}} reentrant-checkpoint-no-input-grad at {LAYER0}$", text, re.M), text
    assert "(loss grad_fn none; trainable tensors 32: 0 ok, 32 none, 0 zero, 0 non-finite)" in text
    assert "fix (safe): Install the input-grad hook" in text  # the fix's title says what to do
    assert "  below 'error': use-cache-in-training" in text  # what did not fail is named, not hidden


def test_fails_on_a_broken_trainer(tmp_path):
    trainer = script("adapter_resume_frozen").build(str(tmp_path))
    text = failure(trainer, trainable="lora_")
    assert "adapter-frozen" in text and f"at {LAYER0}.self_attn.q_proj.lora_A.default" in text


def test_optimizer_that_misses_the_adapters_fails():
    model = lora("tiny-llama")
    head_only = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n], lr=1e-3)
    text = failure(model, optimizer=head_only)
    assert "param-not-in-optimizer" in text and "lora_B" in text


# ----- thresholds and input ---------------------------------------------------------------------------------------
def test_fail_on_thresholds():
    model = lora("tiny-llama")
    model.base_model.model.lm_head.weight.requires_grad_(True)  # costly head beside the adapters: a warning
    report = assert_gradient_flow(model)  # warnings pass at the default threshold
    assert "trainable-embeddings-costly" in report.slugs()
    text = failure(model, fail_on="warning")
    assert "trainable-embeddings-costly" in text and "at or above 'warning'" in text

    frozen = lora("tiny-llama")
    frozen.requires_grad_(False)
    assert assert_gradient_flow(frozen, fail_on="never").fails("error")  # only reports


def test_bad_input_is_one_clear_error_at_the_call():
    with pytest.raises(ValueError) as err:
        assert_gradient_flow(lora("tiny-llama"), fail_on="fatal")
    assert str(err.value) == ("assert_gradient_flow(fail_on='fatal'): fail_on must be one of 'error', 'warning', "
                              "'never'")
    # pytest's report of it: the caller's line alone, no frame inside gradflow
    assert [entry.path for entry in err.traceback.filter(err)] == [Path(__file__)]
    with pytest.raises(GradflowError, match="'model' is NoneType"):
        assert_gradient_flow({"batch": batch(seed=1)})
