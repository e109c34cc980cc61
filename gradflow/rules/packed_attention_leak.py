"""## What it does
Checks, on a packed probe batch (several samples in one row, `position_ids` restarting at each sample), that a
sample's loss has zero gradient with respect to the input embeddings of every other sample. It fires when it
does not: attention crosses the sample boundaries. The probe differentiates each later sample's loss w.r.t. the
input embeddings (`gradflow probe-backward --packed`, or any probe whose batch is packed).

## Why is this bad?
Packing only means the same as unpacked training when each sample sees only itself. When attention crosses the
boundaries, every sample is trained with the previous samples of its row as hidden context: the loss and the
gradients differ from the unpacked run, the model learns to rely on unrelated text, and nothing raises. In
transformers the block-diagonal mask comes from the position ids only when the forward has no KV cache and no
`attention_mask`, and only for attention implementations that build their mask through masking_utils. So a
default `use_cache=True` config trained without gradient checkpointing leaks, and so does a collator that adds an
all-ones `attention_mask` to packed rows.

## Example
```python
batch = collate_packed(rows)              # input_ids, labels, position_ids: no attention_mask
batch["attention_mask"] = torch.ones_like(batch["input_ids"])   # plain causal mask over the whole row: leaks
model.config.use_cache = True             # without checkpointing: a cache is built, packing detection skipped
```
Use instead:
```python
model.config.use_cache = False            # training: no KV cache
batch.pop("attention_mask", None)         # position_ids carry the boundaries
```

## Fix safety
Display-only: the cause is the training setup (the collator, the config, the attention implementation); the
finding names it. Turning the cache off and dropping the mask do not change an unpacked run's results.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural

_CAUSE_TEXT = {
    "cache": "the forward built a KV cache (use_cache is on and checkpointing is off), so transformers skipped the "
             "packed-sequence mask",
    "attention-mask": "the batch carries an attention_mask, so transformers skipped the packed-sequence mask and "
                      "masks only padding",
    "implementation": "the attention implementation does not derive sample boundaries from position_ids",
}

_FIX_TITLE = {
    "cache": "Set model.config.use_cache = False for training",
    "attention-mask": "Drop attention_mask from packed batches (position_ids carry the boundaries)",
    "implementation": "Load the model with attn_implementation='sdpa' (or flash_attention_2 / flex_attention), or "
                      "train without packing",
}


def check(snap):
    leak = snap.packed_leak
    if leak is None or not leak.leaks:
        return []
    impl = leak.attn_implementation or "unknown"
    first = max(leak.leaks, key=lambda p: p.ratio)
    pairs = plural(len(leak.leaks), "sample") + (" gets" if len(leak.leaks) == 1 else " get")
    causes = [c for c in leak.causes if c in _CAUSE_TEXT]
    why = "; ".join(_CAUSE_TEXT[c] for c in causes) if causes else "cause unknown"
    message = (f"in a packed batch of {leak.samples} samples, {pairs} loss gradient from another sample's "
               f"input embeddings (sample {first.sample} ← sample {first.other}, {_ratio(first.ratio)} of its own "
               f"gradient): attention ({impl}) crosses sample boundaries; {why}")
    title = " and ".join(_FIX_TITLE[c] for c in causes) if causes else (
        "Train without packing until the model keeps sample boundaries (attention_mask=None, position_ids "
        "restarting per sample, an attention implementation that reads them)")
    return [RULE.finding(message, location=None, fix_title=title)]


def _ratio(r: float) -> str:
    return "∞×" if r == float("inf") else f"{r:.2g}×"


RULE = Rule(
    code="GF123", slug="packed-attention-leak", severity="error",
    fix_title="Keep sample boundaries in packed batches: use_cache=False, no attention_mask",
    check=check, doc=__doc__,
)
