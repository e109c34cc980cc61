"""## What it does
Fires when a bitsandbytes 4-bit or 8-bit base is trained without the preparation
`peft.prepare_model_for_kbit_training` does: its unquantized parameters (norms, embeddings, head) are still in
half precision, or reentrant checkpointing is on without the input-grad hook. Reentrant checkpointing counts
whether transformers turned it on (`gradient_checkpointing_enable`) or the forward called
`torch.utils.checkpoint(use_reentrant=True)` itself (a custom loop or wrapper); non-reentrant checkpointing needs
no hook, and PEFT's preparation adds none for it.

## Why is this bad?
Layer norms in fp16/bf16 make k-bit training unstable, and PEFT does not add the input-grad hook on quantized
models by itself, so reentrant checkpointing leaves the adapters without gradients.

## Example
```python
model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb, dtype=torch.bfloat16)
model = prepare_model_for_kbit_training(model)      # missing
model = get_peft_model(model, config)
```

When the unquantized parameters are already fp32 (`prepare_model_for_kbit_training(model,
use_gradient_checkpointing=False)` was called, or the model was loaded in fp32), only the input-grad hook is
missing, and the fix says that rather than to call the preparation again.

## Fix safety
Safe: norms are cast to fp32 and the input-grad hook is installed, as prepare_model_for_kbit_training does.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    if snap.quantized == "none" or not any(p.requires_grad for p in snap.params):
        return []
    half = [p for p in snap.params if not p.quantized and not p.adapter and not p.requires_grad
            and p.dtype in ("float16", "bfloat16") and not p.embedding]
    reasons = []
    if half:
        reasons.append(f"{plural(len(half), 'unquantized parameter')} ({short([p.module for p in half], 2)}) "
                       f"are still in {half[0].dtype}")
    # the input embedding is where prepare_model_for_kbit_training puts the hook
    embed = next((p.module for p in snap.params if p.embedding), None)  # input embeddings come first
    gc = reentrant_checkpointing(snap)
    if gc and not snap.input_grad_hook:
        where = f" on {embed}" if embed else ""
        reasons.append(f"{gc} without the input-grad hook{where}")
    if not reasons:
        return []
    message = f"{snap.quantized} quantized base not prepared for training: " + "; ".join(reasons)
    if half:
        return [RULE.finding(message, location=half[0].module, params=[p.name for p in half])]
    # the norms are fp32 already: prepare_model_for_kbit_training(use_gradient_checkpointing=False) ran (or the
    # model was loaded in fp32); only the hook is missing, and calling the preparation again is not the fix
    message += (" (its unquantized parameters are already in fp32, as prepare_model_for_kbit_training leaves them; "
                "it installs the hook only with use_gradient_checkpointing=True)")
    return [RULE.finding(message, location=embed, fix_title=HOOK_ONLY)]


def reentrant_checkpointing(snap) -> str | None:
    """How reentrant checkpointing is on, in words, or None. Only reentrant regions need an input that requires grad."""
    if snap.gc_mode == "reentrant":
        return "reentrant checkpointing is on"
    if any(c.reentrant for c in snap.checkpoints):  # a custom loop or wrapper: transformers' flag stays off
        return "the forward calls torch.utils.checkpoint(use_reentrant=True)"
    return None


HOOK_ONLY = ("Install the input-grad hook: model.enable_input_require_grads() before get_peft_model (or "
             "prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)), or use non-reentrant "
             "checkpointing")

RULE = Rule(
    code="GF205", slug="kbit-not-prepared", severity="warning",
    fix_title="Call peft.prepare_model_for_kbit_training(model) before get_peft_model",
    check=check, doc=__doc__,
)
