"""## What it does
Finds PEFT adapter weights of the active adapter that do not require grad.

## Why is this bad?
The adapter exists but cannot learn. `PeftModel.from_pretrained(base, path)` loads adapters for inference
(`is_trainable=False`), and a `model.requires_grad_(False)` after `get_peft_model` freezes them too. Training
then either raises (nothing requires grad) or silently updates only the other trainable parameters.

## Example
```python
model = PeftModel.from_pretrained(base, "out/adapter")                 # frozen
model = PeftModel.from_pretrained(base, "out/adapter", is_trainable=True)  # trainable
model.load_adapter("out/adapter")                     # transformers' integration: frozen too
AutoModelForCausalLM.from_pretrained("out/adapter")   # loads the base, then the adapter, frozen
```
Adapters count however they were added: a `PeftModel`, transformers' `load_adapter` / `add_adapter` /
`from_pretrained` of an adapter directory, or `peft.inject_adapter_in_model`.

## Fix safety
Safe: the adapter weights are unfrozen; nothing else changes.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural


def check(snap):
    if not snap.is_peft:
        return []
    active = set(snap.active_adapters or snap.adapter_names)
    adapter = [p for p in snap.params if p.adapter and not p.quantized and active & set(p.name.split("."))]
    frozen = [p for p in adapter if not p.requires_grad]
    if not frozen:
        return []
    share = "all" if len(frozen) == len(adapter) else f"{len(frozen)} of {len(adapter)}"
    message = (f"{share} adapter weights of {', '.join(sorted(active))} are frozen "
               f"({plural(len(frozen), 'parameter')}, first at {frozen[0].module}); they cannot learn")
    return [RULE.finding(message, location=frozen[0].module, params=[p.name for p in frozen],
                         fix_title=_FIX_TITLES.get(snap.adapter_source))]


# how each way of adding adapters loads them trainable (a PeftModel's is the rule's own fix title)
_FIX_TITLES = {
    "transformers": "Unfreeze the adapter (model.load_adapter(..., is_trainable=True))",
    "injected": "Unfreeze the adapter weights that inject_adapter_in_model added",
}


RULE = Rule(
    code="GF111", slug="adapter-frozen", severity="error",
    fix_title="Unfreeze the adapter (PeftModel.from_pretrained(..., is_trainable=True))",
    check=check, doc=__doc__,
)
