"""Packed-batch leak measurement: does one sample's loss have gradient w.r.t. another sample's input embeddings?

Runs on a packed probe batch (position_ids restarting inside a row). The input embedding output is swapped for a
detached leaf that requires grad, the model runs once in train mode, and each later sample's loss (its own
next-token cross-entropy, summed) is differentiated w.r.t. that leaf (autograd.grad; .backward() under a
reentrant checkpoint, which refuses autograd.grad); every parameter's `.grad` is put back as it was.
With the boundaries kept, the gradient on every other sample's rows is exactly zero (masked attention
probabilities are exactly 0); anything above `REL_TOL` of the sample's own gradient is a leak.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from gradflow.data.packing import segments
from gradflow.forward import call_model
from gradflow.models import transformers_model
from gradflow.snapshot import LeakPair, PackedLeak

REL_TOL = 1e-6  # of the sample's own max |grad|; a kept boundary gives exactly 0


def measure(model, batch: Mapping) -> PackedLeak:
    """Measure cross-sample gradient on a packed batch; errors are recorded, never raised."""
    import torch

    spans = segments(batch["position_ids"])
    rows = len(spans)
    if batch["position_ids"].dim() == 2 and batch["position_ids"].shape[0] == 1 and _batch_rows(batch) > 1:
        spans = spans * _batch_rows(batch)  # position ids given once for every row
        rows = len(spans)
    state = PackedLeak(samples=sum(len(s) for s in spans), rows=rows,
                       attn_implementation=attn_implementation(model),
                       attention_mask_given=batch.get("attention_mask") is not None)
    leaf = {}

    def swap(module, args, output):
        if "e" in leaf or not isinstance(output, torch.Tensor):
            return None
        leaf["e"] = output.detach().requires_grad_(True)
        return leaf["e"]

    inputs = dict(batch)
    hook = None
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]  # under a reentrant checkpoint the measurement needs .backward()
    if inputs.get("inputs_embeds") is not None:
        leaf["e"] = inputs["inputs_embeds"].detach().requires_grad_(True)
        inputs["inputs_embeds"] = leaf["e"]
    else:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            state.error = "the model has no get_input_embeddings(); pass inputs_embeds in the batch"
            return state
        hook = emb.register_forward_hook(swap)
    try:
        with torch.enable_grad(), _no_donated_buffers():
            out = call_model(model, inputs)
            state.cache_created = _has_cache(out)
            logits = _logits(out)
            embeds = leaf.get("e")
            if logits is None or embeds is None:
                state.error = "no logits in the output" if logits is None else "the input embeddings never ran"
                return state
            _differentiate(state, spans, logits, embeds, batch)
    except Exception as exc:  # e.g. flex_attention has no CPU backward: data, not a crash
        text = str(exc).strip().splitlines()
        state.error = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    finally:
        if hook is not None:
            hook.remove()
        for p, g in zip(params, saved):
            p.grad = g
    if state.leaks:
        state.causes = boundary_causes(model, attention_mask_given=state.attention_mask_given,
                                       cache_created=state.cache_created)
    return state


def to_dict(state: PackedLeak) -> dict:
    """The measurement as JSON ("packed_check" in a probe report); an infinite ratio is null."""
    import dataclasses
    import math

    data = dataclasses.asdict(state)
    fin = lambda v: v if math.isfinite(v) else None  # noqa: E731
    data["max_ratio"] = fin(data["max_ratio"])
    for pair in data["leaks"]:
        pair["ratio"] = fin(pair["ratio"])
    return data


def _batch_rows(batch) -> int:
    ids = batch.get("input_ids")
    if ids is None:
        ids = batch.get("inputs_embeds")
    return int(ids.shape[0]) if ids is not None and ids.dim() >= 2 else 1


def _differentiate(state: PackedLeak, spans, logits, embeds, batch) -> None:
    import torch

    targets = batch.get("labels")
    ids = batch.get("input_ids")
    flat = [(r, a, b) for r, row in enumerate(spans) for a, b in row]
    index = {span: k for k, span in enumerate(flat)}
    # later samples only: causal attention can only carry an earlier sample into a later one's loss
    todo = [(r, a, b) for r, row in enumerate(spans) for j, (a, b) in enumerate(row) if j > 0 and b - a > 1]
    own_max, other_max, other_at = [], [], []
    mode = {"backward": False}
    for r, a, b in todo:
        tgt = None
        if targets is not None:
            tgt = targets[r, a + 1:b]
            if not bool((tgt != -100).any()):
                tgt = None
        if tgt is None and ids is not None:
            tgt = ids[r, a + 1:b]
        if tgt is None:
            state.error = "no labels or input_ids to build each sample's loss from"
            return
        lp = torch.log_softmax(logits[r, a:b - 1].float(), dim=-1)
        keep = tgt != -100
        loss = -(lp[keep].gather(-1, tgt[keep].unsqueeze(-1))).sum()
        grad = _grad(loss, embeds, mode)
        if grad is None:
            grad = torch.zeros_like(embeds)
        g = grad.detach().abs().amax(dim=-1)  # [rows, T]: the largest component per token
        own_max.append(g[r, a:b].max())
        mask = torch.ones_like(g, dtype=torch.bool)
        mask[r, a:b] = False
        masked = torch.where(mask, g, torch.zeros_like(g))
        other_max.append(masked.max())
        other_at.append(masked.flatten().argmax())
    state.checked = len(todo)
    if not todo:
        return
    own, other, at = (torch.stack(v).float().cpu().tolist() for v in (own_max, other_max, other_at))  # one sync
    width = embeds.shape[1]
    for (r, a, b), o, x, pos in zip(todo, own, other, at):
        ratio = x / o if o > 0 else (float("inf") if x > 0 else 0.0)
        state.max_ratio = max(state.max_ratio, ratio)
        if ratio > REL_TOL:
            rr, t = divmod(int(pos), width)
            other_k = next((index[(rr, c, d)] for c, d in spans[rr] if c <= t < d), -1)
            state.leaks.append(LeakPair(sample=index[(r, a, b)], other=other_k, ratio=ratio))


def _grad(loss, embeds, mode):
    """d loss / d embeds, the graph kept for the next sample. autograd.grad touches no parameter's .grad, but a
    reentrant checkpoint refuses it; then .backward() (the caller puts the parameters' .grad back)."""
    import torch

    if not mode["backward"]:
        try:
            return torch.autograd.grad(loss, embeds, retain_graph=True, allow_unused=True)[0]
        except RuntimeError as exc:
            if "use_reentrant=True" not in str(exc):
                raise
            mode["backward"] = True
    embeds.grad = None
    loss.backward(retain_graph=True)
    grad, embeds.grad = embeds.grad, None
    return grad


def _has_cache(out) -> bool:
    keys = out.keys() if isinstance(out, Mapping) else ()
    return any(k in keys for k in ("cache", "past_key_values"))


def _logits(out):
    import torch

    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if logits is None and isinstance(out, torch.Tensor) and out.dim() == 3:
        logits = out
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None


def attn_implementation(model) -> str | None:
    """config._attn_implementation of the transformers model inside `model`, or None."""
    tm = transformers_model(model)
    config = getattr(tm if tm is not None else model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def uses_masking_utils(model) -> bool | None:
    """Whether the model's transformers code builds its mask through masking_utils (None: not a transformers model)."""
    found = None
    for m in model.modules():
        mod = type(m).__module__
        if not mod.startswith("transformers.models."):
            continue
        g = vars(sys.modules[mod]) if mod in sys.modules else {}
        if any(name in g for name in ("create_causal_mask", "create_sliding_window_causal_mask")):
            return True
        found = False
    return found


def boundary_causes(model, *, attention_mask_given: bool, cache_created: bool | None) -> list[str]:
    """Known reasons transformers would not keep sample boundaries: cache | attention-mask | implementation.

    `cache_created=None` predicts it from the config (use_cache on, no gradient checkpointing, train mode).
    """
    causes = []
    tm = transformers_model(model)
    if cache_created is None and tm is not None:
        gc = bool(getattr(tm, "is_gradient_checkpointing", False))
        cache_created = bool(getattr(tm.config, "use_cache", False)) and not gc
    if cache_created:
        causes.append("cache")
    if attention_mask_given:
        causes.append("attention-mask")
    impl = attn_implementation(model)
    if impl is not None:
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            known = impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        except ImportError:  # pragma: no cover - a transformers without masking_utils
            known = False
        if not known or uses_masking_utils(model) is False:
            causes.append("implementation")
    elif tm is None:
        causes.append("implementation")  # a model of your own: only its code knows about position_ids
    return causes


def _no_donated_buffers():
    """One backward per later sample needs retain_graph; a compiled backward (flex_attention on CUDA) donates its
    buffers and refuses that unless donation is off while the graph is built."""
    import contextlib

    try:
        import torch._functorch.config as fconfig
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(fconfig, "donated_buffer"):
        return contextlib.nullcontext()
    return fconfig.patch(donated_buffer=False)


def packing_blockers(model) -> list[str]:
    """Why transformers would not keep sample boundaries for this model (empty when the packed path holds).

    Static: the cache and the attention implementation. `measure` is the measured truth.
    """
    return boundary_causes(model, attention_mask_given=False, cache_created=None)
