"""## What it does
Unfreezes the weights of the active PEFT adapter (lora_A / lora_B, and its modules_to_save copies) and marks the
adapter's config as trainable (`inference_mode=False`): what `PeftModel.from_pretrained(..., is_trainable=True)`
would have done.

## Why this fix
An adapter loaded for inference cannot learn; training it was the point.

## Fix safety
Safe: only the adapter's own weights are unfrozen; the base stays frozen.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan
from gradflow.models import is_peft_model, tuner_layer_class, untrained_tuner_params, within

ANSWERS = ("adapter-frozen",)


def adapter_params(model, adapters):
    """(name, param) of the adapters' own weights: LoRA matrices and modules_to_save copies, not the base, and not
    what PEFT's tuner layers keep frozen on purpose (other_param_names: AdaLoRA's ranknum)."""
    untrained = untrained_tuner_params(model.named_modules())
    for name, p in model.named_parameters():
        segments = name.split(".")
        if any(a in segments for a in adapters) and p.is_floating_point() and not within(name, untrained):
            yield name, p


def _configs(model) -> dict:
    """The adapters' configs: a PeftModel's, or those transformers / inject_adapter_in_model left on the model."""
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, dict) else {}


def plan(ctx, finding):
    # adapters count however they got there: PeftModel, transformers' load_adapter/add_adapter, inject_adapter_in_model
    if not (is_peft_model(ctx.model) or ctx.snap.is_peft):
        return None
    active = list(ctx.snap.active_adapters or ctx.snap.adapter_names)
    frozen = [n for n, p in adapter_params(ctx.model, active) if not p.requires_grad]
    if not frozen:
        return None
    configs = [a for a in active if a in _configs(ctx.model)]
    return Plan(fix=FIX, data={"adapters": active, "source": ctx.snap.adapter_source}, answers=[finding.slug],
                location=finding.location,
                changes=[f"requires_grad=True on {len(frozen)} weights of adapter {', '.join(active)}",
                         *([f"peft_config[{configs[0]!r}].inference_mode = False"] if configs else [])],
                why="the adapter was loaded for inference (is_trainable=False) or frozen by hand; training it needs "
                    "its weights to require grad")


def _has_tuner_layers(model) -> bool:
    tuner = tuner_layer_class()
    return tuner is not None and any(isinstance(m, tuner) for m in model.modules())


def apply(model, data, env=None) -> list[str]:
    configs = _configs(model)
    if not configs and not _has_tuner_layers(model):
        return []
    adapters = [a for a in data["adapters"] if a in configs or not configs]
    changed = 0
    for _, p in adapter_params(model, adapters):
        if not p.requires_grad:
            p.requires_grad_(True)
            changed += 1
    for a in adapters:
        if a in configs and getattr(configs[a], "inference_mode", False):
            configs[a].inference_mode = False
    return [f"unfroze {changed} adapter weights ({', '.join(adapters)})"] if changed else []


_LOAD_TRAINABLE = {
    "transformers": "# or load it trainable: model.load_adapter(path, is_trainable=True)",
    "injected": "# or unfreeze it right after inject_adapter_in_model",
}


def snippet(data) -> list[str]:
    adapters = data["adapters"]
    test = f"{adapters[0]!r} in name.split('.')" if len(adapters) == 1 else \
        f"any(a in name.split('.') for a in {adapters!r})"
    configs = [] if data.get("source") == "injected" else [
        f"model.peft_config[{a!r}].inference_mode = False" for a in adapters]
    return [_LOAD_TRAINABLE.get(data.get("source"),
                                "# or load it trainable: PeftModel.from_pretrained(base, path, is_trainable=True)"),
            "for name, param in model.named_parameters():",
            f"    if {test} and param.is_floating_point():",
            "        param.requires_grad_(True)",
            *configs]


FIX = Fix(id="unfreeze-adapter", title="Unfreeze the adapter (as is_trainable=True would)", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
