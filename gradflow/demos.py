"""Factories that reproduce real gradient-flow failures, for `gradflow probe-backward gradflow.demos:NAME`."""

from __future__ import annotations

from gradflow.setup.presets import build_preset, build_tokenizer, preset_config


def seed_bug():
    """The case gradflow was born from (SPEC §1), on a tiny Phi-3.

    LoRA is added with `get_peft_model` *before* reentrant gradient checkpointing is turned on, so the
    input-grad hook is never installed: the frozen embedding feeds checkpointed layers whose inputs do not
    require grad, the LoRA weights inside get None, and the loss has no grad_fn.
    """
    return _seed_setup("tiny-phi3", quant=None, device="cpu", dtype=None, seq_len=32)


def seed_bug_phi35():
    """seed_bug at the seed's real size: a Phi-3.5-mini-shaped model (3.8B, random init) in bf16 on the GPU."""
    return _seed_setup("phi3.5-mini-shape", quant=None, device=_gpu(), dtype="bfloat16", seq_len=512)


def seed_bug_phi35_4bit():
    """seed_bug at real size on a 4-bit (bitsandbytes nf4) base, as QLoRA users run it."""
    return _seed_setup("phi3.5-mini-shape", quant="4bit", device=_gpu(), dtype="bfloat16", seq_len=512)


def _gpu() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _seed_setup(preset: str, *, quant, device: str, dtype, seq_len: int):
    import torch
    from peft import LoraConfig, get_peft_model

    torch_dtype = getattr(torch, dtype) if dtype else None
    if quant is None:
        model = build_preset(preset, dtype=torch_dtype, device=device, seed=0)
    else:
        import tempfile

        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        base = build_preset(preset, dtype=torch_dtype, device=device, seed=0)
        with tempfile.TemporaryDirectory(prefix="gradflow-demo-") as tmp:
            base.save_pretrained(tmp)
            del base
            model = AutoModelForCausalLM.from_pretrained(
                tmp, device_map={"": device}, dtype=torch_dtype,
                quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch_dtype or torch.float32))
        # the seed prepared the k-bit base but turned checkpointing on only later, by hand
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    # transformers 5.x installs the input-grad hook inside gradient_checkpointing_enable; 4.57, the seed's
    # stack, never did in this order. Removing it gives 5.x the seed's state (SPEC §1: "removed hooks").
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()
    vocab = preset_config(preset).vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {"model": model, "batch": batch, "tokenizer": build_tokenizer()}
