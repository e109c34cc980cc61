"""PEFT methods other than LoRA, whose weights live in nn.ParameterDict (never called itself, unlike lora_A's
nn.Linear): IA3 (ia3_l), VeRA (vera_lambda_b / vera_lambda_d), AdaLoRA (lora_A / lora_E / lora_B, and a frozen
ranknum). Real PEFT on the tiny presets, seeded."""

from __future__ import annotations

from torch import nn

from tests.helpers.builders import base

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def config(method: str, **kwargs):
    """PEFT's config for `method` (ia3 | vera | adalora) over the attention and down projections."""
    from peft import AdaLoraConfig, IA3Config, VeraConfig

    if method == "ia3":
        options = {"target_modules": TARGETS, "feedforward_modules": ["down_proj"]}
        cls = IA3Config
    elif method == "vera":  # VeRA shares one projection pair: its targets must have one shape (q, o: 64 -> 64)
        options = {"r": 8, "target_modules": ["q_proj", "o_proj"]}
        cls = VeraConfig
    else:
        options = {"init_r": 4, "target_r": 2, "target_modules": TARGETS, "total_step": 10}
        cls = AdaLoraConfig
    options.update(task_type="CAUSAL_LM", **kwargs)
    return cls(**options)


def adapted(method: str, preset: str = "tiny-llama", **kwargs):
    """get_peft_model(preset, config(method))."""
    from peft import get_peft_model

    return get_peft_model(base(preset), config(method, **kwargs))


class NoGradPrefix(nn.Module):
    """A user's wrapper that runs a decoder layer under torch.no_grad to 'save memory on the lower layers'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        import torch

        with torch.no_grad():
            return self.inner(*args, **kwargs)


def first_layer_without_grad(model):
    """Layer 0 of a PEFT-wrapped Llama run under torch.no_grad() by a wrapper."""
    layers = model.get_base_model().model.layers
    layers[0] = NoGradPrefix(layers[0])
    return model
