"""The one table: finding codes → rule modules. Codes are never reused; a renamed code is redirected here."""

from __future__ import annotations

# code: (slug, module in gradflow.rules)
CODES: dict[str, tuple[str, str]] = {
    "GF101": ("reentrant-checkpoint-no-input-grad", "reentrant_checkpoint_no_input_grad"),
    "GF102": ("nested-checkpoint", "nested_checkpoint"),
    "GF103": ("ddp-reentrant-checkpoint", "ddp_reentrant_checkpoint"),
    "GF104": ("checkpoint-changes-gradients", "checkpoint_changes_gradients"),
    "GF105": ("fsdp-mixed-requires-grad", "fsdp_mixed_requires_grad"),
    "GF106": ("fsdp-mixed-dtype", "fsdp_mixed_dtype"),
    "GF107": ("ddp-unused-parameters", "ddp_unused_parameters"),
    "GF110": ("no-trainable-parameters", "no_trainable_parameters"),
    "GF111": ("adapter-frozen", "adapter_frozen"),
    "GF112": ("intended-param-frozen", "intended_param_frozen"),
    "GF113": ("inference-tensor-params", "inference_tensor_params"),
    "GF114": ("requires-grad-changed", "requires_grad_changed"),
    "GF120": ("graph-break", "graph_break"),
    "GF121": ("loss-detached", "loss_detached"),
    "GF122": ("no-supervised-tokens", "no_supervised_tokens"),
    "GF123": ("packed-attention-leak", "packed_attention_leak"),
    "GF124": ("loss-term-no-grad", "loss_term_no_grad"),
    "GF130": ("nonfinite-grad", "nonfinite_grad"),
    "GF131": ("grad-all-zero", "grad_all_zero"),
    "GF140": ("param-not-in-optimizer", "param_not_in_optimizer"),
    "GF141": ("param-not-updated", "param_not_updated"),
    "GF142": ("zero-learning-rate", "zero_learning_rate"),
    "GF150": ("step-raised", "step_raised"),
    "GF201": ("trainable-param-unused", "trainable_param_unused"),
    "GF202": ("trainable-embeddings-costly", "trainable_embeddings_costly"),
    "GF203": ("half-precision-trainable-params", "half_precision_trainable_params"),
    "GF204": ("trainable-param-not-saved", "trainable_param_not_saved"),
    "GF205": ("kbit-not-prepared", "kbit_not_prepared"),
    # the coverage fallback: trainable parameters without a gradient that no other finding names
    "GF209": ("grad-missing-unexplained", "grad_missing_unexplained"),
    "GF301": ("lora-zero-init", "lora_zero_init"),
    "GF302": ("use-cache-in-training", "use_cache_in_training"),
    # raised while training, by GradFlowCallback
    "GF401": ("grad-missing-in-training", "grad_missing_in_training"),
    "GF402": ("adapter-not-updated", "adapter_not_updated"),
}

# Old code → current code, so that documentation links and --ignore lists keep working.
REDIRECTS: dict[str, str] = {}

SLUGS: dict[str, str] = {slug: code for code, (slug, _) in CODES.items()}


def lookup(code_or_slug: str) -> str | None:
    """The current code for a code or slug, or None."""
    key = code_or_slug.strip()
    upper = key.upper()
    upper = REDIRECTS.get(upper, upper)
    if upper in CODES:
        return upper
    return SLUGS.get(key.lower())
