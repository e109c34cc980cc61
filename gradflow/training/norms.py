"""Per-layer gradient norms for GradFlowCallback's check steps, with one device-to-host read per check."""

from __future__ import annotations

import math

import torch

from gradflow.training.fsdp import local, sum_over_shards


def layer_norms(params, groups: list[str], group_index: torch.Tensor) -> tuple[list, dict[str, float], list[str]]:
    """(the (name, grad) pairs that have a gradient, {layer: norm}, names of those with a NaN/Inf gradient)."""
    present = [(n, p.grad) for n, p in params if p.grad is not None]
    if not present:
        return present, {}, []
    device = group_index.device
    sq = torch.stack([torch.linalg.vector_norm(local(g.detach()), dtype=torch.float32).to(device) ** 2
                      for _, g in present])
    sq = sum_over_shards(sq, [g for _, g in present])
    idx = torch.tensor([i for i, (_, p) in enumerate(params) if p.grad is not None], device=device)
    per_group = torch.zeros(len(groups), device=device).index_add_(0, group_index[idx], sq)
    values = torch.cat([per_group, sq]).tolist()  # one device→host read for the whole check
    group_sq, param_sq = values[: len(groups)], values[len(groups):]
    layers = {g: math.sqrt(v) if math.isfinite(v) else float("nan") for g, v in zip(groups, group_sq)}
    nonfinite = [n for (n, _), v in zip(present, param_sq) if not math.isfinite(v)]
    return present, layers, nonfinite
