"""Factories at real size for the GPU checks of issues 18 and 20: a Phi-3.5-mini-shaped model (random init) built
on the GPU, loaded in 4-bit nf4, prepared as QLoRA users do (non-reentrant checkpointing, use_cache off), LoRA r16
on every linear layer; each factory adds one fault that issue 18 names.

    gradflow probe-backward bench/gpu_factories.py:aux_term_detached
    gradflow probe-backward bench/gpu_factories.py:lower_layers_no_grad
"""

from __future__ import annotations

import gc
import tempfile

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from gradflow.setup.presets import build_preset, preset_config

PRESET = "phi3.5-mini-shape"


def _qlora():
    base = build_preset(PRESET, dtype=torch.bfloat16, device="cuda", seed=0)
    with tempfile.TemporaryDirectory(prefix="gradflow-bench-") as tmp:
        base.save_pretrained(tmp)
        del base
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(
            tmp, device_map={"": "cuda"}, dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))


def _batch(seq_len: int = 512) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, preset_config(PRESET).vocab_size, (2, seq_len), generator=gen).cuda()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def aux_term_detached():
    """A hidden-state penalty computed from detached features and added to the loss: it trains nothing."""

    def loss_fn(model, batch):
        out = model(**batch, output_hidden_states=True)
        penalty = out.hidden_states[-1].detach().float().pow(2).mean()
        return out.loss + 0.01 * penalty

    return {"model": _qlora(), "batch": _batch(), "loss_fn": loss_fn}


class _NoGrad(torch.nn.Module):
    """A user's wrapper that runs a decoder layer under no_grad 'to save memory on the lower layers'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.inner(*args, **kwargs)


def lower_layers_no_grad():
    """Layers 0 and 1 run under no_grad: their adapters (2 layers x 7 linears x A, B) never get a gradient."""
    model = _qlora()
    layers = model.get_base_model().model.layers
    for i in (0, 1):
        layers[i] = _NoGrad(layers[i])
    return {"model": model, "batch": _batch()}
