"""Trainer factories at a real size, for `gradflow probe-backward bench/trainer_factories.py:NAME` on a GPU.

A Phi-3.5-mini-shaped model (3.8B, random init) is built on the GPU, quantized to 4-bit (bitsandbytes nf4) or kept
in bf16, wrapped with LoRA r16 on all linear layers and handed to a plain `transformers.Trainer` with
`gradient_checkpointing=True`, as users write their train.py. Needs a CUDA GPU.
"""

from __future__ import annotations

import tempfile

import torch

OUT = tempfile.mkdtemp(prefix="gradflow-trainer-")


def _model(quant: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gradflow.setup.presets import build_preset

    base = build_preset("phi3.5-mini-shape", dtype=torch.bfloat16, device="cuda", seed=0)
    if quant:
        with tempfile.TemporaryDirectory(prefix="gradflow-phi35-") as tmp:
            base.save_pretrained(tmp)
            del base
            base = AutoModelForCausalLM.from_pretrained(
                tmp, device_map={"": "cuda"}, dtype=torch.bfloat16,
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16))
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                           task_type="CAUSAL_LM"))


def _trainer(model, optimizer=None, reentrant=None):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(3, 32000, (512,), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    args = TrainingArguments(output_dir=OUT, per_device_train_batch_size=2, max_steps=4, learning_rate=2e-4,
                             bf16=True, gradient_checkpointing=True, report_to=[], save_strategy="no",
                             gradient_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant})
    return Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))


def healthy_4bit():
    """QLoRA through a plain Trainer, checkpointing from TrainingArguments: healthy on transformers 5.x."""
    return _trainer(_model(quant=True))


def reentrant_4bit():
    """The same with `use_reentrant=True` asked for explicitly (4.57's default), as many older scripts do."""
    return _trainer(_model(quant=True), reentrant=True)


def optimizer_misses_lora_b_bf16():
    """A hand-built optimizer over lora_A only: every lora_B tensor gets a gradient but is never stepped."""
    model = _model(quant=False)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n], lr=2e-4)
    return _trainer(model, optimizer=opt)
