"""The typed sections of a Report, one per part of the schema (gradflow.schema()) beyond the probe's own fields.

Each is a TypedDict: a plain dict at run time (so the JSON is the dict as it is), with its keys declared here, in
one place, for readers and type checkers. `PatchOutcome` is a dataclass: patch's keys sit at the top level of its
JSON, and `Report.to_dict` spreads them there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict


class TrainSection(TypedDict, total=False):
    """`train`: how the run went. `status` is None until it ends: completed | refused | stopped | interrupted."""

    status: str | None
    options: dict
    output: str
    refused_because: list[str]
    packing: bool
    attention: dict  # {attn, why}
    ce: dict  # {loss: standard | chunked, why}
    compile: dict  # {compiled, layers, why}
    resume: dict  # {from, step, differences, damaged}
    already_complete: bool
    steps: int
    max_steps: int
    stopped_at: int | None
    tokens: int
    seconds: float
    tokens_per_second: float
    world_size: int
    losses: list[dict]  # [{step, loss}]
    loss_first: float | None
    loss_last: float | None
    gradients: dict  # the watch's last check: checks, missing, nonfinite, params_moved, per_layer, ...
    findings: list[dict]  # raised while training
    signal: str
    checkpoint: str
    adapter: str
    merged: str
    grad_norms_png: str


class DataSection(TypedDict, total=False):
    """`data`: the training file as read (schema: train_data)."""

    file: str
    samples: int
    used: int
    skipped: list[str]
    think_samples: int
    supervised_tokens: int
    truncated: int
    previews: list[dict]
    audit: str
    packed_batches: int


class PreflightSection(TypedDict, total=False):
    """`preflight`: train's probe → patch → probe before the first step."""

    patch_available: bool
    patched: bool
    patch: dict | None  # the patch report's JSON
    errors_before: list[str]
    errors_after: list[str]
    recipe: dict | None  # {path, changes} with --recipe


class DistributedSection(TypedDict, total=False):
    """`distributed`: how findings were gathered across ranks under torchrun."""

    wrapper: str  # ddp | fsdp | fsdp1 (probe-backward)
    world_size: int
    backend: str
    batch: str
    ranks_disagree: list[str]
    ranks_disagree_count: int
    preflight_batch: str
    findings_on_some_ranks: list[dict]


class DryRunSection(TypedDict, total=False):
    """`dry_run` of probe-backward / inspect: what the weight-free run on a toy-width twin did and could not see."""

    method: str
    config: str
    config_class: str
    twin: dict
    full_size: dict
    weights_loaded: bool
    not_seen: list[str]
    not_seen_values: list[str]
    unmapped_params: list[str]
    unmapped_count: int


@dataclasses.dataclass
class PatchOutcome:
    """What patch did beyond the probes: its keys are top-level keys of the patch report's JSON."""

    dry_run: bool
    unsafe_fixes: bool
    plan: list[dict]  # --dry-run: the fixes it would apply
    advice: list[dict]  # display-only fixes: code to paste
    skipped_unsafe: list[dict]  # unsafe fixes not applied without --unsafe-fixes
    verification: dict | None  # {ok, intended, receiving, loss_grad_fn}; None on a dry run
    rolled_back: dict | None
    snippet: str | None
    saved: dict | None = None  # patch --save: what was written

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["saved"] is None:
            del data["saved"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PatchOutcome":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})
