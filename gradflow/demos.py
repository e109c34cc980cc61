"""Factories that reproduce real gradient-flow failures, for `gradflow probe-backward gradflow.demos:NAME`."""

from __future__ import annotations


def seed_bug():
    """The case gradflow was born from (SPEC §1), on a tiny Phi-3.

    LoRA is added with `get_peft_model` *before* reentrant gradient checkpointing is turned on, so the
    input-grad hook is never installed: the frozen embedding feeds checkpointed layers whose inputs do not
    require grad, the LoRA weights inside get None, and the loss has no grad_fn.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from gradflow.presets import build_preset, build_tokenizer

    model = build_preset("tiny-phi3", seed=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    # transformers 5.x installs the input-grad hook inside gradient_checkpointing_enable; 4.57, the seed's
    # stack, never did in this order. Removing it gives 5.x the seed's state (SPEC §1: "removed hooks").
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 32), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {"model": model, "batch": batch, "tokenizer": build_tokenizer()}
