"""## What it does
Finds FSDP units whose parameters do not share one dtype where torch requires one: an FSDP1 unit
(`FullyShardedDataParallel`) that would flatten parameters of several dtypes (fp32 adapters with a bf16 base), or a
`fully_shard` (FSDP2) group whose trainable parameters have several dtypes. It reads the units planned for FSDP1
(`gradflow.setup.wrappers.plan_fsdp1`; for a `Trainer` whose TrainingArguments ask for FSDP1, planned from its FSDP
settings) and the groups of a model `fully_shard` already wrapped. Static: found before the first step.

## Why is this bad?
FSDP1 flattens a unit into one `FlatParameter` of one dtype: wrapping raises `ValueError: Must flatten tensors with
uniform dtype`, with or without `use_orig_params`. `fully_shard` accepts the model, then the first forward raises
`AssertionError: FSDP expects uniform original parameter dtype` for the trainable parameters of a group.
A mixed-precision policy does not reconcile them in torch 2.13: `MixedPrecision(param_dtype=...)` (FSDP1) casts the
flat parameter after it is built, and `MixedPrecisionPolicy(param_dtype=...)` (FSDP2) checks the original dtypes
before casting. (Frozen parameters of another dtype in a `fully_shard` group are allowed.)

## Example
```python
base = AutoModelForCausalLM.from_pretrained(..., torch_dtype=torch.bfloat16)
model = get_peft_model(base, config, autocast_adapter_dtype=True)   # adapters in fp32, base in bf16
FullyShardedDataParallel(model, use_orig_params=True,
                         mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))  # still raises
```
Give every parameter of a unit one dtype (`model.to(torch.bfloat16)`, or load the base in fp32 and let the policy
cast), or put the adapters in units of their own (`peft.utils.other.fsdp_auto_wrap_policy(model)`).

## Fix safety
Display-only: the dtypes and the wrap policy are set where the model is loaded and wrapped.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, layer_span, short


def check(snap):
    by_name = {p.name: p for p in snap.params}
    bad: dict[str, list] = {"fsdp1": [], "fsdp2": []}
    for unit in snap.wrappers:
        if unit.kind not in bad:
            continue
        params = [by_name[n] for n in unit.params if n in by_name and not by_name[n].quantized]
        if unit.kind == "fsdp2":  # fully_shard checks the trainable parameters only
            params = [p for p in params if p.requires_grad]
        dtypes: dict[str, list[str]] = {}
        for p in params:
            dtypes.setdefault(p.dtype, []).append(p.name)
        if len(dtypes) > 1:
            bad[unit.kind].append((unit, dtypes))
    found = []
    for kind, units in bad.items():
        if not units:
            continue
        names = [u.module for u, _ in units]
        where = layer_span(names) if names[0] else "the root module"
        merged: dict[str, list[str]] = {}
        for _, dtypes in units:
            for d, ps in dtypes.items():
                merged.setdefault(d, []).extend(ps)
        mix = ", ".join(f"{len(ps)} {d} ({short(ps, 1)})" for d, ps in sorted(merged.items()))
        policy = units[0][0].param_dtype
        tail = f"; the mixed-precision param_dtype={policy} does not reconcile them" if policy else ""
        if kind == "fsdp1":
            message = (f"{len(units)} FSDP1 unit(s) ({where}) would flatten parameters of several dtypes, {mix}: "
                       f"wrapping raises 'Must flatten tensors with uniform dtype'{tail}")
        else:
            message = (f"{len(units)} fully_shard group(s) ({where}) hold trainable parameters of several dtypes, "
                       f"{mix}: the first forward raises 'FSDP expects uniform original parameter dtype'{tail}")
        # name the trainable side (the adapters, usually), else the smaller dtype group
        trainable = {p.name for p in snap.params if p.requires_grad}
        named = sorted(merged.values(), key=lambda ps: (not set(ps) <= trainable, len(ps)))[0]
        found.append(RULE.finding(message, location=names[0] or None, params=named))
    return found


RULE = Rule(
    code="GF106", slug="fsdp-mixed-dtype", severity="error",
    fix_title="Give each FSDP unit one parameter dtype, or put the adapters in units of their own",
    check=check, doc=__doc__,
)
