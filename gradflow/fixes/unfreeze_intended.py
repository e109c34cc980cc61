"""## What it does
Unfreezes the parameters matching your `trainable` regex. On a PEFT model, those outside the adapter move into
`modules_to_save` (see `modules-to-save`) so that `save_pretrained` keeps them; adapter weights are unfrozen in
place.

## Why this fix
You named them as what you intend to train. `get_peft_model` froze them because they sit outside the LoRA
targets (custom modules such as SO(8) rotations, a new head).

## Fix safety
Safe: only the parameters you named become trainable.
"""

from __future__ import annotations

import re

from gradflow.fixes._base import Fix, Plan
from gradflow.fixes.save_trainable import save_targets, snippet_lines, wrap_modules_to_save
from gradflow.models import is_peft_model

ANSWERS = ("intended-param-frozen",)


def frozen_intended(model, regex: str) -> list[str]:
    pattern = re.compile(regex)
    out = []
    for name, p in model.named_parameters():
        if (pattern.search(name) and not p.requires_grad and p.is_floating_point()
                and "original_module" not in name.split(".")):
            out.append(name)
    return out


def _split(model, names):
    """(in place, modules to wrap, adapter) for a PEFT model; everything in place otherwise."""
    if not is_peft_model(model):
        return names, [], None
    adapter = (list(getattr(model, "active_adapters", None) or []) or [model.active_adapter])[0]
    modules, stuck = save_targets(model, names, adapter)
    in_place = [n for n in names if n in stuck or not any(f".{m}." in f".{n}" for m in modules)]
    return in_place, modules, adapter


def plan(ctx, finding):
    regex = ctx.trainable or ctx.snap.trainable_regex
    if not regex:
        return None
    names = frozen_intended(ctx.model, regex)
    if not names:
        return None
    in_place, modules, adapter = _split(ctx.model, names)
    changes = []
    if in_place:
        changes.append(f"requires_grad=True on {len(in_place)} parameters matching {regex!r}")
    if modules:
        changes.append(f"{', '.join(modules)} added to peft_config[{adapter!r}].modules_to_save and wrapped: "
                       "a trainable copy that save_pretrained writes")
    data = {"regex": regex, "adapter": adapter, "modules_to_save": modules}
    return Plan(fix=FIX, data=data, answers=[finding.slug], location=finding.location, changes=changes,
                why="these parameters match what you intend to train"
                    + ("; outside the adapter, modules_to_save is how PEFT keeps them trainable and saved"
                       if modules else ""))


def apply(model, data, env=None) -> list[str]:
    names = frozen_intended(model, data["regex"])
    if not names:
        return []
    in_place, modules, adapter = _split(model, names)
    changed = []
    if modules:
        changed.extend(wrap_modules_to_save(model, adapter, modules, keep_trainable=set(names)))
    params = dict(model.named_parameters())
    count = 0
    for name in in_place:
        p = params.get(name)
        if p is not None and not p.requires_grad:
            p.requires_grad_(True)
            count += 1
    if count:
        changed.append(f"unfroze {count} parameters matching {data['regex']!r}")
    return changed


def snippet(data) -> list[str]:
    lines = []
    if data.get("modules_to_save") and data.get("adapter"):
        lines = snippet_lines(data["adapter"], data["modules_to_save"])
    return lines + ["import re",
                    "for name, param in model.named_parameters():",
                    "    if 'original_module' in name or not param.is_floating_point():",
                    "        continue",
                    f"    if re.search({data['regex']!r}, name):",
                    "        param.requires_grad_(True)"]


FIX = Fix(id="unfreeze-intended", title="Unfreeze the intended parameters (via modules_to_save on a PEFT model)",
          applicability="safe", answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
