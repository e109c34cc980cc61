"""## What it does
Finds an FSDP1 unit (`FullyShardedDataParallel` without `use_orig_params=True`) whose flat parameter would hold
frozen and trainable original parameters together. It reads the units planned for the model
(`gradflow.setup.wrappers.plan_fsdp1`, from the wrap policy) before the model is wrapped; for a `Trainer` whose
TrainingArguments ask for FSDP1, gradflow plans them from its FSDP settings (the policy accelerate builds, or PEFT's
`fsdp_auto_wrap_policy` for a PeftModel, as the Trainer swaps it in). Static: found before the first step.

## Why is this bad?
FSDP1 flattens every original parameter of a unit into one `FlatParameter`, which has a single `requires_grad`.
Without `use_orig_params=True` it refuses the mix: wrapping raises `ValueError` ("... has both parameters with
requires_grad=True and False" with an auto-wrap policy, else "Must flatten tensors with uniform `requires_grad` when
`use_orig_params=False`"). LoRA is the common case: the frozen base weight and the trainable
`lora_A` / `lora_B` of one layer land in the same unit.

## Example
```python
model = get_peft_model(base, LoraConfig(...))           # frozen base + trainable adapters
FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))  # raises
```
Pass `use_orig_params=True` (FSDP keeps the original parameters and their `requires_grad`), or wrap the adapter
modules as units of their own (`peft.utils.other.fsdp_auto_wrap_policy(model)`), or move to `fully_shard` (FSDP2).

## Fix safety
Display-only: the FSDP options are set where the model is wrapped.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, layer_span, plural, short


def check(snap):
    by_name = {p.name: p for p in snap.params}
    units, trainable, frozen = [], [], 0
    for unit in snap.wrappers:
        if unit.kind != "fsdp1" or unit.use_orig_params:
            continue
        params = [by_name[n] for n in unit.params if n in by_name and not by_name[n].quantized]
        on = [p.name for p in params if p.requires_grad]
        off = len(params) - len(on)
        if on and off:
            units.append(unit.module)
            trainable += on
            frozen += off
    if not units:
        return []
    where = layer_span(units) if units[0] else "the root module"
    message = (f"{plural(len(units), 'FSDP1 unit')} ({where}) would flatten "
               f"{plural(len(trainable), 'trainable parameter')} ({short(trainable, 2)}) with {plural(frozen, 'frozen one')} into one flat parameter without "
               "use_orig_params=True: wrapping raises ValueError (a unit with both requires_grad=True and False)")
    return [RULE.finding(message, location=units[0] or None, params=trainable)]


RULE = Rule(
    code="GF105", slug="fsdp-mixed-requires-grad", severity="error",
    fix_title="Wrap with use_orig_params=True, or give the adapters FSDP units of their own",
    check=check, doc=__doc__,
)
