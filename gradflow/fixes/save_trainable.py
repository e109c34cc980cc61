"""## What it does
Moves trainable parameters that sit outside the adapter into PEFT's `modules_to_save`: the module that holds them
is added to `peft_config[adapter].modules_to_save` and wrapped the way `get_peft_model(..., LoraConfig(
modules_to_save=[...]))` wraps it (a trainable copy that `save_pretrained` writes and `from_pretrained` reloads;
the original stays frozen behind it).

## Why this fix
`get_peft_model` freezes custom modules outside the LoRA targets (the SO(8) rotations of the seed case).
Unfreezing them by hand makes them train, but `save_pretrained` saves only adapter weights and modules_to_save:
the learned values would vanish.

## Fix safety
Safe: the copy starts from the current values; the forward is unchanged. Parameters of the module that were not
trainable stay frozen in the copy. An optimizer built before the patch does not hold the copies: build it after.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, base_prefix
from gradflow.models import is_peft_model

ANSWERS = ("trainable-param-not-saved",)


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def save_targets(model, param_names, adapter) -> tuple[list[str], list[str]]:
    """(module names for modules_to_save, parameter names that cannot move there) for `param_names`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = base_prefix(model)
    modules, stuck = [], []
    for name in param_names:
        owner = _owner(name)
        segments = name.split(".")
        if adapter in segments or "original_module" in segments or not owner.startswith(prefix.rstrip(".")):
            stuck.append(name)
            continue
        try:
            parent = model.get_submodule(_owner(owner))
        except AttributeError:
            stuck.append(name)
            continue
        # a LoRA-wrapped layer's own weights cannot be copied out from under the adapter
        if isinstance(parent, BaseTunerLayer) or isinstance(model.get_submodule(owner), BaseTunerLayer):
            stuck.append(name)
            continue
        rel = owner[len(prefix):] if prefix else owner
        if rel and rel not in modules:
            modules.append(rel)
    return modules, stuck


def wrap_modules_to_save(model, adapter: str, modules: list[str], keep_trainable: set[str] | None = None) -> list[str]:
    """Add `modules` to modules_to_save of `adapter` and wrap them; return what changed.

    `keep_trainable`: parameter names (as before wrapping) that must be trainable in the copy; other parameters of
    the copied modules keep the flag they had.
    """
    from peft.utils.other import ModulesToSaveWrapper, _set_trainable

    config = model.peft_config[adapter]
    prefix = base_prefix(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    changed, todo = [], []
    for rel in modules:
        full = prefix + rel
        module = model.get_submodule(full)
        if isinstance(module, ModulesToSaveWrapper):
            continue
        todo.append(rel)
    if not todo:
        return []
    config.modules_to_save = list(dict.fromkeys(list(config.modules_to_save or []) + todo))
    for rel in todo:
        # one module at a time, by its full path: PEFT matches modules_to_save by name suffix
        _set_trainable(model, adapter, module_names=[rel], inference_mode=False)
        full = prefix + rel
        wrapper = model.get_submodule(full)
        copy = wrapper.modules_to_save[adapter]
        for pname, p in copy.named_parameters():
            old = f"{full}.{pname}"
            want = flags.get(old, False) or (keep_trainable is not None and old in keep_trainable)
            if p.requires_grad != want:
                p.requires_grad_(want)
        changed.append(f"{full} wrapped in modules_to_save[{adapter!r}] (saved by save_pretrained)")
    return changed


def plan(ctx, finding):
    if not is_peft_model(ctx.model):
        return None
    adapter = (ctx.snap.active_adapters or ctx.snap.adapter_names or ("default",))[0]
    # not worth a copy: a module the forward never runs (trainable-param-unused says so), an embedding matrix
    # (the copy would double its memory; trainable-embeddings-costly offers the cheap way), one an unsafe fix
    # of this patch refreezes
    skip = ctx.doomed() | {p.name for p in ctx.snap.params if p.used is False or p.embedding}
    modules, stuck = save_targets(ctx.model, [n for n in finding.params if n not in skip], adapter)
    if not modules:
        return None
    changes = [f"add {', '.join(modules)} to peft_config[{adapter!r}].modules_to_save and wrap "
               f"{'it' if len(modules) == 1 else 'them'}: a trainable copy that save_pretrained writes"]
    if stuck:
        changes.append(f"{len(stuck)} parameters cannot move (inside a LoRA layer): they stay unsaved")
    return Plan(fix=FIX, data={"adapter": adapter, "modules": modules}, answers=[finding.slug],
                location=finding.location, changes=changes,
                why="modules_to_save is how PEFT saves and reloads trainable modules outside the adapter; unfrozen by "
                    "hand they train but are dropped by save_pretrained")


def apply(model, data, env=None) -> list[str]:
    if not is_peft_model(model) or data["adapter"] not in model.peft_config:
        return []
    return wrap_modules_to_save(model, data["adapter"], data["modules"])


def snippet(data) -> list[str]:
    return snippet_lines(data["adapter"], data["modules"])


def snippet_lines(adapter: str, modules: list[str]) -> list[str]:
    return [f"# or pass LoraConfig(..., modules_to_save={modules!r}) to get_peft_model",
            "from peft.utils.other import _set_trainable",
            f"peft_config = model.peft_config[{adapter!r}]",
            f"peft_config.modules_to_save = list(peft_config.modules_to_save or []) + {modules!r}",
            f"for name in {modules!r}:",
            f"    _set_trainable(model, {adapter!r}, module_names=[name], inference_mode=False)"]

FIX = Fix(id="modules-to-save", title="Add the module to modules_to_save so the adapter saves it", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
