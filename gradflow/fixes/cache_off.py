"""## What it does
Sets `config.use_cache = False` for training, and drops a legacy tuple `past_key_values` (and `use_cache=True`)
from the training batch.

## Why this fix
A KV cache only serves generation. Under checkpointing transformers turns it off with a warning on every step,
and a legacy tuple cache is rejected or mixes stale keys into attention.

## Fix safety
Safe: training results do not change; set `use_cache=True` again before generating, if you want the cache there.
"""

from __future__ import annotations

from collections.abc import Mapping

from gradflow.fixes._base import Fix, Plan
from gradflow.models import transformers_model

ANSWERS = ("use-cache-in-training",)


def _config(model):
    tm = transformers_model(model)
    return getattr(tm if tm is not None else model, "config", None)


def plan(ctx, finding):
    config = _config(ctx.model)
    data, changes = {}, []
    if config is not None and getattr(config, "use_cache", False):
        data["use_cache"] = False
        changes.append("config.use_cache = False")
    batch = ctx.batch
    if isinstance(batch, Mapping) and isinstance(batch.get("past_key_values"), (tuple, list)):
        data["drop_past_key_values"] = True
        changes.append("past_key_values dropped from the training batch")
    if isinstance(batch, Mapping) and batch.get("use_cache") is True:
        data["drop_past_key_values"] = True
        changes.append("use_cache=True dropped from the training batch")
    if not data:
        return None
    return Plan(fix=FIX, data=data, answers=[finding.slug], changes=changes,
                why="a cache serves generation only; in training it is ignored with a warning or breaks the forward")


def apply(model, data, env=None) -> list[str]:
    changed = []
    config = _config(model)
    if data.get("use_cache") is False and config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        changed.append("config.use_cache = False")
    batch = getattr(env, "batch", None)
    if data.get("drop_past_key_values") and isinstance(batch, Mapping):
        if batch.pop("past_key_values", None) is not None:
            changed.append("past_key_values dropped from the batch")
        if batch.get("use_cache") is True:
            batch.pop("use_cache")
            changed.append("use_cache=True dropped from the batch")
    return changed


def snippet(data) -> list[str]:
    lines = []
    if data.get("use_cache") is False:
        lines.append("model.config.use_cache = False  # training: no KV cache")
    if data.get("drop_past_key_values"):
        lines.append("batch.pop('past_key_values', None)  # never pass a cache to a training forward")
        lines.append("batch.pop('use_cache', None)")
    return lines


FIX = Fix(id="cache-off", title="Train without a KV cache (use_cache=False, no past_key_values)", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
