"""inference-tensor-params: parameters made under torch.inference_mode, found before any forward.

Each fault is also trained on without gradflow, to record how the step really fails.
"""

from __future__ import annotations

import pytest
import torch

import gradflow
from tests.helpers.builders import STACK, assert_fires, assert_healthy, assert_silent, base, batch, lora, probe

SLUG = "inference-tensor-params"
SAVED_FOR_BACKWARD = "Inference tensors cannot be saved for backward"


def _train_step(model) -> str | None:
    """One plain AdamW step with no gradflow involved: None, or 'phase: error' where it failed."""
    data = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    phase = "forward"
    try:
        loss = model(**data).loss
        phase = "backward"
        loss.backward()
        phase = "step"
        optimizer.step()
    except RuntimeError as exc:
        return f"{phase}: {str(exc).splitlines()[0]}"
    return None


def _static(model):
    """Found from the parameters alone: no forward."""
    return gradflow.inspect(model, static=True)


# --- fires ------------------------------------------------------------------------------------------------------------
def test_model_built_under_inference_mode():
    """A full fine-tune of a model built (or loaded) inside an evaluation block."""
    with torch.inference_mode():
        model = base()
    finding = assert_fires(_static(model), SLUG, location="model.embed_tokens")
    assert len(finding.params) == sum(1 for _ in model.parameters())
    assert finding.message.startswith(f"{len(finding.params)} trainable parameters")
    assert finding.fix.applicability == "display-only"
    assert _train_step(model).startswith(f"forward: {SAVED_FOR_BACKWARD}")
    assert_fires(probe(model, batch(model)), SLUG)  # beside the probe's own account of the failed forward


def test_lora_added_under_inference_mode():
    """get_peft_model inside inference mode: bias-free lora_A/lora_B outputs silently stop requiring grad, and the
    loss has no grad_fn (the error gradflow was born from, for another reason)."""
    model = base()
    with torch.inference_mode():
        model = lora(model=model)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    finding = assert_fires(_static(model), SLUG, location=first)
    assert sorted(finding.params) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert _train_step(model) == "backward: element 0 of tensors does not require grad and does not have a grad_fn"


def test_base_built_under_inference_mode_then_lora():
    """The base is built under inference mode, LoRA added outside it: the LoRA weights are fine, but autograd
    cannot save the frozen base weights it has to differentiate through."""
    with torch.inference_mode():
        built = base()
    model = lora(model=built)
    assert not any(p.is_inference() for p in model.parameters() if p.requires_grad)
    finding = assert_fires(_static(model), SLUG, location="base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert "frozen parameters beside trainable ones" in finding.message and "trainable parameter" not in finding.message
    assert not any("embed_tokens" in p for p in finding.params)  # a lookup table breaks nothing
    assert _train_step(model).startswith(f"forward: {SAVED_FOR_BACKWARD}")


def test_from_pretrained_under_inference_mode(preset_dir):
    """from_pretrained inside inference mode: transformers 4.57 returns inference tensors, 5.x normal ones."""
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        loaded = AutoModelForCausalLM.from_pretrained(str(preset_dir("tiny-llama")))
    model = lora(model=loaded)
    if STACK == "new":
        assert not any(p.is_inference() for p in model.parameters())
        assert_silent(_static(model), SLUG)
        assert _train_step(model) is None
        return
    assert_fires(_static(model), SLUG, location="base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    assert _train_step(model).startswith(f"forward: {SAVED_FOR_BACKWARD}")


def test_embeddings_resized_under_inference_mode():
    """resize_token_embeddings inside inference mode replaces the embedding and head with inference tensors."""
    model = base()
    with torch.inference_mode():
        model.resize_token_embeddings(520, mean_resizing=False)
    finding = assert_fires(_static(model), SLUG, location="model.embed_tokens")
    assert sorted(finding.params) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert _train_step(model).startswith(f"forward: {SAVED_FOR_BACKWARD}")


def test_data_clone_workaround_still_fires():
    """`p.data = p.data.clone()` makes is_inference() False, yet the Parameter keeps no version counter."""
    model = base()
    with torch.inference_mode():
        model = lora(model=model)
    for p in model.parameters():
        if p.is_inference():
            p.data = p.data.clone()
    assert not any(p.is_inference() for p in model.parameters())
    assert_fires(_static(model), SLUG)
    assert _train_step(model) == "forward: Inference tensors do not track version counter."


# --- stays silent -----------------------------------------------------------------------------------------------------
def test_silent_for_a_healthy_lora():
    model = lora()
    assert_healthy(probe(model, batch(model)))


def test_silent_after_evaluating_under_inference_mode():
    """Running the model under inference mode makes no parameter an inference tensor."""
    model = lora()
    with torch.inference_mode():
        model(**batch(model))
    assert_silent(_static(model), SLUG)
    assert _train_step(model) is None


def test_silent_when_nothing_is_trainable_yet():
    """A model loaded under inference mode and used for inference only: nothing to train, nothing to say here."""
    with torch.inference_mode():
        model = base()
    model.requires_grad_(False)
    assert_silent(_static(model), SLUG)


def test_silent_for_a_frozen_inference_embedding():
    """Only the frozen embedding table is an inference tensor: lookups save indices, so LoRA trains."""
    model = base()
    with torch.inference_mode():
        table = torch.nn.Embedding(*model.get_input_embeddings().weight.shape)
    model.set_input_embeddings(table)
    model = lora(model=model)
    assert model.get_input_embeddings().weight.is_inference()
    assert_silent(_static(model), SLUG)
    assert _train_step(model) is None


@pytest.mark.parametrize("tied", [False, True])
def test_silent_after_the_documented_repair(tied):
    """The advice in the rule's doc (a fresh nn.Parameter per inference parameter) really repairs the model."""
    with torch.inference_mode():
        model = base("tiny-gpt2" if tied else "tiny-llama")
    fresh = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_inference():
                new = fresh.setdefault(id(p), torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
                setattr(module, name, new)
    assert_silent(_static(model), SLUG)
    if tied:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert _train_step(model) is None
