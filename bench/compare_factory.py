"""The model, LoRA and tokenizer every run of bench/train_compare.py shares, built as a user would build them.

The model is gradflow's preset (`phi3.5-mini-shape`: Phi-3.5-mini's shapes, 3.8B, random init with seed 0; or
`tiny-phi3` for --smoke), built directly on the device in bf16 — the same weights `gradflow train PRESET` builds.
With `quant="4bit"` it goes through a save/load round-trip with a bitsandbytes nf4 config (bf16 compute) and
`prepare_model_for_kbit_training`, as gradflow's --quant 4bit does. LoRA: r16, alpha 32, all linear layers,
no dropout. The tokenizer is gradflow's local byte-level one with the chat template and /think tokens (no hub).
"""

from __future__ import annotations

import gc
import tempfile

LORA_R, LORA_ALPHA = 16, 32


def tokenizer():
    from gradflow.setup.presets import build_tokenizer

    return build_tokenizer()


def base_model(preset: str, *, device: str, dtype: str = "bfloat16", attn: str = "sdpa", quant: str = "none",
               seed: int = 0):
    """The preset's random-init causal LM on `device`, with attention `attn` and optional 4-bit quantization."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradflow.setup.presets import preset_config

    torch_dtype = getattr(torch, dtype)
    config = preset_config(preset)
    torch.manual_seed(seed)  # as gradflow.setup.presets.build_preset: the same weights as `gradflow train PRESET`
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    if quant == "none":
        return model
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory(prefix="gradflow-bench-") as tmp:
        model.save_pretrained(tmp)
        del model
        gc.collect()  # the model sits in reference cycles: without it the bf16 weights may outlive `del` (gradflow too)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, device_map={"": device}, dtype=torch_dtype, attn_implementation=attn,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch_dtype))
    # checkpointing is left to the Trainer's arguments, as each run configures it
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def lora(model):
    """LoRA r16 / alpha 32 on every linear layer (PEFT's "all-linear": the output head excluded)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


def phi35_lora():
    """`gradflow probe-backward bench/compare_factory.py:phi35_lora`: the bench's bf16 LoRA model on CUDA."""
    return {"model": lora(base_model("phi3.5-mini-shape", device="cuda")), "tokenizer": tokenizer()}


def phi35_qlora():
    """The same, 4-bit nf4 (QLoRA)."""
    return {"model": lora(base_model("phi3.5-mini-shape", device="cuda", quant="4bit")), "tokenizer": tokenizer()}
