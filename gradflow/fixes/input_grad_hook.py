"""## What it does
Makes the tensors that enter reentrant checkpointed regions require grad, at the place where the inputs really
enter: a forward hook on the input embedding (`PreTrainedModel.enable_input_require_grads()` on a transformers
model, the model inside a PeftModel), or, when `inputs_embeds` is passed or the model hides its embeddings, a
forward pre-hook on the module that calls the first checkpointed region, marking its floating inputs.

## Why this fix
A reentrant checkpoint passes gradients to the parameters inside only when one of its inputs requires grad. The
hook costs one extra activation gradient through the embedding output: cheap. The alternative, non-reentrant
checkpointing, changes memory behaviour, so it is chosen only when no entry point can carry the hook.

## Fix safety
Safe: it only marks activations as requiring grad; the gradients the parameters get are the ones they should get.
"""

from __future__ import annotations

from collections.abc import Mapping

from gradflow.errors import GradflowError
from gradflow.fixes._base import Fix, Plan, ancestors, base_prefix, describe_module, submodule_expr
from gradflow.models import has_hook, is_input_grad_hook, is_peft_model, mark_hook, transformers_model
from gradflow.probing.describe import hook_names

ANSWERS = ("reentrant-checkpoint-no-input-grad",)
_NOT_INPUTS = ("mask", "position", "label", "cache")


def make_inputs_require_grads(module, inputs, output):
    """Forward hook: the embedding output requires grad, so reentrant checkpointed regions after it pass gradients."""
    import torch

    if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
        output.requires_grad_(True)


def make_region_inputs_require_grads(module, args, kwargs):
    """Forward pre-hook: floating inputs (not masks or positions) require grad while training."""
    import torch

    if not (module.training and torch.is_grad_enabled()):
        return None

    def ready(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)  # a new view: the caller's tensor keeps its flag
        return t

    args = tuple(ready(a) for a in args)
    kwargs = {k: (v if any(s in k for s in _NOT_INPUTS) else ready(v)) for k, v in kwargs.items()}
    return args, kwargs


mark_hook(make_region_inputs_require_grads, "region-inputs-require-grads")


def cut_regions(snap):
    """Reentrant checkpointed regions of the forward that got no input requiring grad, in call order."""
    return [c for c in snap.checkpoints if c.reentrant and c.phase == "forward" and c.depth == 0 and c.grad_args == 0]


def has_input_grad_hook(module) -> bool:
    return any(is_input_grad_hook(h) for h in hook_names(module))


def entry_embedding(ctx):
    """(embedding module, 'enable_input_require_grads' | 'forward-hook') where the token inputs enter, or (None, None)."""
    import torch

    tm = transformers_model(ctx.model)
    owner = tm if tm is not None else ctx.model
    emb = None
    if hasattr(owner, "get_input_embeddings"):
        try:
            emb = owner.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is not None and hasattr(emb, "register_forward_hook"):
        via = "enable_input_require_grads" if tm is not None and hasattr(tm, "enable_input_require_grads") else "forward-hook"
        return emb, via
    # a custom model: the first nn.Embedding the forward ran
    ran = []
    for name, module in ctx.model.named_modules():
        state = ctx.module_state(name)
        if isinstance(module, torch.nn.Embedding) and state is not None and state.ran:
            ran.append((state.order if state.order is not None else 1 << 30, name, module))
    if ran:
        return min(ran, key=lambda r: r[0])[2], "forward-hook"
    return None, None


def _tied_copies_that_ran(ctx, emb) -> list[str]:
    """Modules that ran holding the input embedding's own weight, when the one get_input_embeddings() returns did not
    run (transformers 4.57's BART: `model.shared` is tied to encoder.embed_tokens and decoder.embed_tokens, which
    are the ones called, so enable_input_require_grads() hooks a module that never fires)."""
    import torch

    weight = getattr(emb, "weight", None)
    if weight is None:
        return []
    out = []
    for name, module in ctx.model.named_modules():
        state = ctx.module_state(name)
        if isinstance(module, torch.nn.Embedding) and module is not emb and module.weight is weight \
                and state is not None and state.ran and not has_input_grad_hook(module):  # not a tied output head
            out.append(name)
    return out


def region_caller(snap, call) -> str | None:
    """The module whose forward called the checkpointed region `call` (the nearest ancestor that ran)."""
    if call is None:
        return None
    if call.caller is not None:
        state = snap.module(call.caller)
        # transformers >= 5 checkpoints inside the layer's own forward: the layer's caller is one level up
        if state is not None and state.gc != "off" and call.location == call.caller:
            for name in ancestors(call.caller):
                up = snap.module(name)
                if up is not None and up.ran:
                    return name
        return call.caller
    for name in ancestors(call.location or ""):
        state = snap.module(name)
        if state is not None and state.ran:
            return name
    return None


def _entry_paths(model) -> set[str]:
    """The model and the PEFT wrappers' inner models: modules that receive the batch as it is."""
    prefix = base_prefix(model).rstrip(".")
    paths = {""}
    while prefix:
        paths.add(prefix)
        prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    return paths


def _floating_batch(batch) -> bool:
    import torch

    if isinstance(batch, Mapping):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() and not any(s in k for s in _NOT_INPUTS)
                   for k, v in batch.items())
    items = batch if isinstance(batch, (tuple, list)) else [batch]
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in items)


def hook_plan(ctx, answers, *, need_region: bool = True) -> Plan | None:
    """The cheapest place for the input-grad hook, or None when no entry point can carry it."""
    snap = ctx.snap
    cut = cut_regions(snap)
    first = cut[0] if cut else None
    if not snap.inputs_embeds_given:
        emb, via = entry_embedding(ctx)
        path = ctx.module_path(emb) if emb is not None else None
        state = ctx.module_state(path)
        paths = []
        if emb is not None and path is not None and state is not None and state.ran is False:
            # BART's `shared` on 4.57: the encoder and decoder run their own tied copies, so a hook on it (PEFT puts
            # one there for checkpointed models) never fires
            paths, via = _tied_copies_that_ran(ctx, emb), "forward-hook"
        elif emb is not None and path is not None and not has_input_grad_hook(emb):
            paths = [path]
        if paths:
            data = {"where": "embedding", "via": via, "module": paths[0], "peft": is_peft_model(ctx.model)}
            if len(paths) > 1:
                data["modules"] = paths
            how = ("PreTrainedModel.enable_input_require_grads()" if via == "enable_input_require_grads"
                   else "a forward hook")
            return Plan(fix=FIX, data=data, answers=list(answers), location=paths[0], key="input-grad-hook",
                        changes=[f"forward hook make_inputs_require_grads on {p} ({how}): its output requires grad"
                                 for p in paths],
                        why=("the hook sits where the token inputs enter and costs one extra activation gradient "
                             "through the embedding output (cheap); non-reentrant checkpointing would also work but "
                             "changes memory behaviour"))
    if first is None and need_region:
        return None
    caller = region_caller(snap, first) if first is not None else None
    if caller is not None and (snap.inputs_embeds_given or (caller in _entry_paths(ctx.model) and _floating_batch(ctx.batch))):
        label = caller or "the model"
        why = ("inputs_embeds is passed, so the embedding never runs and a hook there would never fire; "
               if snap.inputs_embeds_given else "the model's inputs are already floating tensors; ")
        return Plan(fix=FIX, data={"where": "region-inputs", "module": caller}, answers=list(answers),
                    location=caller, key="input-grad-hook",
                    changes=[f"forward pre-hook make_region_inputs_require_grads on {label}: its floating inputs "
                             f"(not masks or positions) require grad, so the checkpointed region at "
                             f"{first.location} gets an input that requires grad"],
                    why=why + "marking the inputs of the first checkpointed region costs one extra activation gradient "
                              "(cheap), while non-reentrant checkpointing changes memory behaviour")
    return None


def plan(ctx, finding):
    return hook_plan(ctx, [finding.slug])


def apply(model, data, env=None) -> list[str]:
    if data["where"] == "embedding":
        if data["via"] == "enable_input_require_grads":
            tm = transformers_model(model)
            if tm is None:
                raise GradflowError(f"{type(model).__name__} is not a transformers model: cannot call "
                                    "enable_input_require_grads()", "Patch the model this recipe was made for")
            emb = tm.get_input_embeddings()
            if has_input_grad_hook(emb):
                return []
            tm.enable_input_require_grads()
            return [f"enable_input_require_grads() on {type(tm).__name__}"]
        done = []
        for path in data.get("modules", [data["module"]]):
            emb = model.get_submodule(path)
            if not has_input_grad_hook(emb):
                emb.register_forward_hook(make_inputs_require_grads)
                done.append(f"forward hook make_inputs_require_grads on {path}")
        return done
    target = model.get_submodule(data["module"])
    if has_hook(target._forward_pre_hooks, "region-inputs-require-grads"):
        return []
    target.register_forward_pre_hook(make_region_inputs_require_grads, with_kwargs=True)
    return [f"forward pre-hook make_region_inputs_require_grads on {data['module'] or 'the model'}"]


def snippet(data) -> list[str]:
    if data["where"] == "embedding" and data["via"] == "enable_input_require_grads":
        target = "model.get_base_model()" if data.get("peft") else "model"
        return [f"{target}.enable_input_require_grads()  # after checkpointing is turned on"]
    if data["where"] == "embedding":
        return ["def make_inputs_require_grads(module, inputs, output):",
                "    output.requires_grad_(True)",
                *(f"{submodule_expr(path)}.register_forward_hook(make_inputs_require_grads)"
                  for path in data.get("modules", [data["module"]]))]
    return ["def make_region_inputs_require_grads(module, args, kwargs):",
            "    def ready(t):",
            "        if torch.is_tensor(t) and t.is_floating_point() and not t.requires_grad:",
            "            return t.detach().requires_grad_(True)",
            "        return t",
            "    if module.training and torch.is_grad_enabled():",
            "        args = tuple(ready(a) for a in args)",
            f"        kwargs = {{k: v if any(s in k for s in {_NOT_INPUTS!r}) else ready(v) for k, v in kwargs.items()}}",
            "    return args, kwargs",
            f"{submodule_expr(data['module'])}.register_forward_pre_hook(make_region_inputs_require_grads, "
            "with_kwargs=True)"]


def advice_for_custom_region(ctx, finding) -> Plan:
    """Display-only: the checkpoint call is the user's and no entry point can carry a hook."""
    cut = cut_regions(ctx.snap)
    first = cut[0] if cut else None
    caller = region_caller(ctx.snap, first) if first is not None else None
    where = describe_module(ctx.model, caller) if caller is not None else (finding.location or "your checkpoint call")
    return Plan(fix=FIX, data={}, answers=[finding.slug], location=caller, applicability="display-only",
                key=f"advice:{finding.slug}:{caller}",
                changes=[f"in {where}: make the tensor passed to checkpoint(...) require grad "
                         "(x.requires_grad_(True) on a leaf), or call checkpoint(..., use_reentrant=False)"],
                why="the checkpoint call is in your code and its inputs do not come from an embedding gradflow can hook",
                snippet_lines=[f"# in {where}:",
                               "#     torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False)"])


FIX = Fix(id="input-grad-hook", title="Make the inputs of reentrant checkpointed regions require grad (input-grad hook)",
          applicability="safe", answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
