"""Chunked causal-LM cross-entropy: the loss of `model(**batch).loss` without materialising the full logits.

A causal LM's standard loss computes `lm_head(hidden)` for every position, upcasts all of it to fp32 and only then
takes the cross-entropy: for batch 4 × 2048 tokens × 32k vocab that is 1 GiB of fp32 logits, plus their gradient.
Here the decoder runs as usual, then only the positions that carry a label go through the output head, a chunk of
`chunk_tokens` rows at a time, each chunk under `torch.utils.checkpoint` so that its logits are freed after the
forward and recomputed in the backward. The result is the same number (sum over supervised tokens, divided by
`num_items_in_batch` when given, else by their count), with the labels shifted as transformers shifts them.
Trainer adds no autocast for bf16/fp16 itself: accelerate wraps `model.forward` in it, so the decoder and the head
run here under the same autocast when that wrapper is present.

Where the model's forward does more than `loss_function(lm_head(decoder(...)))` (logit soft-capping or scaling,
router losses, prompt-learning adapters, a custom loss, DDP wrappers, FSDP sharding, an architecture not checked here),
`chunked_causal_lm_loss` returns None and the caller falls back to `model(**inputs).loss`;
`unsupported_reason` says why.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gradflow.models import base_model, is_peft_model

IGNORE_INDEX = -100
# Model types whose *ForCausalLM.forward is `loss_function(lm_head(model(...).last_hidden_state), labels)` in
# transformers 4.57 and 5.x (read from both): nothing between the decoder's last hidden state and the loss.
DENSE_TYPES = frozenset({"llama", "mistral", "phi3", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "starcoder2"})
# Mixture-of-experts types: the same, as long as the router's auxiliary loss is off (it is added to the loss).
MOE_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
# Config attributes that change the logits after lm_head (Gemma-2/3 soft-capping, Cohere, Granite).
_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Inputs the decoder must not see: the loss's own, and PEFT's per-sample adapter routing we cannot reproduce.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")


def _peft_and_causal_lm(model):
    """(the PeftModel or None, the *ForCausalLM inside it or `model` itself, or None when that is no causal LM).
    Not an unwrap: wrappers (DDP) are refused by `unsupported_reason`, not looked through."""
    peft = model if is_peft_model(model) else None
    causal_lm = base_model(model)
    if not hasattr(causal_lm, "get_output_embeddings") or not hasattr(causal_lm, "config"):
        return peft, None
    return peft, causal_lm


def _fsdp_root(model) -> bool:
    """FSDP2's fully_shard on the model itself (or on the causal LM inside a PeftModel): its root unit holds the
    embeddings, final norm and head, gathered only in the root's own forward. Units on the decoder layers alone
    gather themselves when the decoder calls them."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    peft, causal_lm = _peft_and_causal_lm(model)
    return any(isinstance(m, FSDPModule) for m in (model, peft, causal_lm) if m is not None)


def unsupported_reason(model, inputs: dict | None = None) -> str | None:
    """Why the chunked loss cannot reproduce `model(**inputs).loss` for this model (None: it can)."""
    import torch

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "module") and not hasattr(
            model, "config"):
        # calling the decoder directly would skip DDP's forward, which prepares the gradient all-reduce
        return f"{type(model).__name__} wraps the model (DDP): the chunked loss needs the unwrapped model"
    if _fsdp_root(model):
        # the decoder called directly skips the root unit's pre-forward: its weights stay sharded (DTensor)
        return "FSDP shards the model: the embeddings, final norm and head are gathered only in its own forward"
    peft, causal_lm = _peft_and_causal_lm(model)
    if causal_lm is None:
        return f"{type(model).__name__} is not a transformers causal LM"
    if peft is not None:
        config = peft.active_peft_config
        if getattr(config, "is_prompt_learning", False):
            return f"PEFT {config.peft_type} (prompt learning) changes the inputs inside PeftModel.forward"
    if inputs is not None and "adapter_names" in inputs:
        return "per-sample adapter_names route through PeftModel.forward"
    cfg = causal_lm.config
    model_type = getattr(cfg, "model_type", None)
    for name in _LOGIT_CHANGERS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return f"config.{name}={value} changes the logits after the output head"
    if model_type not in DENSE_TYPES | MOE_TYPES:
        return f"model type {model_type!r} is not one whose logits path gradflow has checked"
    if model_type in MOE_TYPES and getattr(cfg, "output_router_logits", False):
        return f"{model_type} with output_router_logits adds the router's auxiliary loss to the loss"
    if "_loss_function" in vars(causal_lm):
        return "the model has a custom loss_function"
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(causal_lm, "loss_type", None)
    if loss_type is not None and LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"]) is not \
            LOSS_MAPPING["ForCausalLM"]:
        return f"loss_type {loss_type!r} is not the causal-LM cross-entropy"
    for obj in {id(o): o for o in (model, causal_lm)}.values():
        # accelerate's mixed-precision wrapper (Trainer's bf16/fp16) is reproduced by _forward_context; any other
        # per-instance forward (device-map hooks, torch.compile, a user's wrapper) is not
        if "forward" in vars(obj) and "_original_forward" not in vars(obj):
            return f"{type(obj).__name__}.forward is wrapped on the instance (hooks or a wrapper)"
    if type(causal_lm).forward.__module__ != type(causal_lm).__module__ or \
            not type(causal_lm).__module__.startswith("transformers.models."):
        return f"{type(causal_lm).__name__}.forward is not transformers' own (patched or subclassed)"
    decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model") or "model", None)
    if not isinstance(decoder, torch.nn.Module) or decoder is causal_lm:
        return f"{type(causal_lm).__name__} has no decoder at .{causal_lm.base_model_prefix}"
    if causal_lm.get_output_embeddings() is None:
        return f"{type(causal_lm).__name__} has no output head"
    if inputs is not None and inputs.get("labels") is None and inputs.get("shift_labels") is None:
        return "the batch has no labels"
    return None


def _forward_context(model):
    """The autocast `model.forward` runs under: accelerate wraps it in the Trainer's mixed precision (Trainer itself
    adds none), and calling the decoder directly would skip that."""
    if "_original_forward" not in vars(model):
        return contextlib.nullcontext()
    from accelerate.utils import get_mixed_precision_context_manager

    return get_mixed_precision_context_manager(native_amp=True)


def chunked_causal_lm_loss(model, inputs: dict[str, Any], num_items_in_batch=None, *,
                           chunk_tokens: int = 4096):
    """The causal-LM loss of `model` on `inputs`, with the output head applied in checkpointed chunks.

    Args:
        model: a transformers *ForCausalLM, or a PeftModel (LoRA family) around one; the output head may be
            LoRA-wrapped or in `modules_to_save`.
        inputs: the batch as `model(**inputs)` takes it: `input_ids` (or `inputs_embeds`), `labels` (or
            `shift_labels`), and `attention_mask` (padded) or `position_ids` (packed), plus any decoder kwargs.
        num_items_in_batch: the denominator (the Trainer's count of supervised tokens over the accumulated
            batches); None: the number of supervised tokens in this batch.
        chunk_tokens: rows of logits computed at once.

    Returns:
        The scalar loss, equal to `model(**inputs, num_items_in_batch=...).loss`, or None where this model's loss
        cannot be reproduced this way (see `unsupported_reason`).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
    if unsupported_reason(model, inputs) is not None:
        return None
    peft, causal_lm = _peft_and_causal_lm(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    head = causal_lm.get_output_embeddings()  # LoRA / ModulesToSaveWrapper dispatch to the active adapter

    labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
    kwargs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
    kwargs["use_cache"] = False
    kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("num_logits_to_keep", None)
    autocast = _forward_context(model)
    with autocast, peft._enable_peft_forward_hooks(**kwargs) if peft is not None else contextlib.nullcontext():
        hidden = decoder(**kwargs).last_hidden_state

    if shift_labels is None:
        # as transformers' ForCausalLMLoss: position t predicts labels[t + 1]; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # only supervised positions go through the head
    flat = hidden.reshape(-1, hidden.shape[-1])

    def chunk_loss(h, t):
        # fp32 as ForCausalLMLoss upcasts; checkpointed: these logits are recomputed in the backward, not kept
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = flat.new_zeros((), dtype=torch.float32) + 0.0 * flat.sum()  # keeps the graph when nothing is supervised
    for start in range(0, rows.numel(), chunk_tokens):
        idx = rows[start:start + chunk_tokens]
        with _forward_context(model):  # entered again: checkpoint's recompute restores the autocast state itself
            total = total + checkpoint(chunk_loss, flat.index_select(0, idx), targets.index_select(0, idx),
                                       use_reentrant=False)
    if num_items_in_batch is None:
        return total / rows.numel() if rows.numel() else total / 0.0  # a mean over nothing is nan, as F.cross_entropy's
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
