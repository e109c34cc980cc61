"""Users' own adapters gated by a trainable parameter that starts at zero (Flamingo / LLaMA-Adapter style): their
zero first gradients are lora-zero-init's to explain, or not, by where the gate sits."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers.builders import base


class TanhGated(nn.Module):
    """Flamingo / LLaMA-Adapter style: h + tanh(gate) * up(relu(down(h))), gate = 0 (the model starts as the base)."""

    def __init__(self, inner, dim: int, rank: int = 4):
        super().__init__()
        self.inner = inner
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = self.inner(x)
        return h + torch.tanh(self.gate) * self.up(torch.relu(self.down(h)))


class SideGated(nn.Module):
    """h + gate() * up(down(h)), the gate a module of its own beside down and up (so not around them)."""

    def __init__(self, inner, dim: int, rank: int = 4):
        super().__init__()
        self.inner = inner
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        self.gate = _Gate()

    def forward(self, x):
        h = self.inner(x)
        return h + self.gate() * self.up(torch.relu(self.down(h)))


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def forward(self):
        return torch.tanh(self.value)


def gated_llama(gate=None):
    """The frozen tiny Llama with a gated adapter around each MLP (TanhGated unless `gate` says; seeded)."""
    model = base()
    model.requires_grad_(False)
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = (gate or TanhGated)(layer.mlp, model.config.hidden_size)
    return model
