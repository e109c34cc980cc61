"""The moved-weights check of GradFlowCallback: did every trainable weight that can have moved by now move?

A sample of each trainable parameter is kept when training begins. Only the optimizer steps that updated (lr > 0,
not an fp16 overflow skip) count, and one side of a LoRA pair whose other side starts at zero needs two of them.
"""

from __future__ import annotations

import re

import torch

_SAMPLE = 1024  # elements kept per parameter to tell whether it moved
_LORA_SIDE = re.compile(r"\.lora_(?:embedding_)?([AB])(?=\.|$)")


class MovedCheck:
    """The trainable parameters as training began, and how many updating steps each needs before it can move."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]] = (), begin_step: int = 0):
        self.params = list(params)
        self.start = [_sample(p) for _, p in self.params]
        self.needs = steps_to_move(self.params)  # per parameter: updating steps before it can move
        self.lr_steps = 0  # optimizer steps since training began that updated (lr > 0, not skipped)
        self.begin_step = begin_step
        self.waiting: list[int] = []  # indices yet to be judged
        self.checked = False  # some parameter has been judged
        self.not_judged: list[str] = []

    def count_step(self, optimizer=None) -> None:
        """One optimizer step taken; it counts when it updated (without an optimizer to ask: always)."""
        if optimizer is None:
            self.lr_steps += 1
        elif not getattr(optimizer, "step_was_skipped", False):  # accelerate: an fp16 overflow skips the update
            if any(float(g.get("lr", 1.0)) > 0 for g in optimizer.param_groups):
                self.lr_steps += 1

    def judge(self, step: int, max_steps: int, indices=None) -> tuple[list[str], str | None]:
        """(names of the parameters that could have moved by `step` and did not, a note on those not judged yet:
        the first time only). The rest wait for a later step."""
        indices = range(len(self.params)) if indices is None else indices
        ready = [i for i in indices if self.needs[i] <= self.lr_steps]
        waiting = [i for i in indices if self.needs[i] > self.lr_steps]
        self.checked = self.checked or bool(ready)
        note = self._waiting_note(step, max_steps, waiting) if waiting and not self.waiting else None
        self.waiting = waiting
        self.not_judged = [self.params[i][0] for i in waiting]
        still = [self.params[i][0] for i in ready
                 if torch.equal(_sample(self.params[i][1]).to(self.start[i].device), self.start[i])]
        return still, note

    def moved(self) -> dict[str, bool]:
        """Per trainable parameter: has it changed since training began?"""
        return {n: not torch.equal(_sample(p).to(start.device), start)
                for (n, p), start in zip(self.params, self.start)}

    def _waiting_note(self, step: int, max_steps: int, waiting: list[int]) -> str:
        why = []
        if any(self.needs[i] > 1 for i in waiting):
            why.append("one side of a LoRA pair whose other side starts at zero gets a zero gradient at its first "
                       "step, so it needs 2 optimizer steps that update")
        ran = step - self.begin_step
        if self.lr_steps < ran:
            why.append(f"{ran - self.lr_steps} of {ran} steps updated nothing (learning rate 0 in warmup, or an "
                       "fp16 overflow skip)")
        last = step >= (max_steps or 0) > 0
        then = ("the run ends before they can move, so they are not checked" if last
                else "they are judged at the first later step they can move")
        return (f"moved-weights check at step {step}: {len(waiting)} of {len(self.params)} trainable parameters "
                f"cannot have moved yet and are not judged (first {self.params[waiting[0]][0]}): "
                f"{'; '.join(why)}; {then}")


def _sample(p: torch.Tensor) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    return flat[::stride][:_SAMPLE].clone()


def steps_to_move(params: list[tuple[str, torch.nn.Parameter]]) -> list[int]:
    """Per trainable parameter, the optimizer steps that update (lr > 0) it needs before it can move.

    One side of a LoRA pair whose trainable partner is all zero (lora_A under PEFT's default init, lora_B = 0)
    gets a zero gradient until the partner has moved: 2 steps. Everything else: 1.
    """
    by_name = {n: p for n, p in params}
    needs = []
    for name, _ in params:
        side = _LORA_SIDE.search(name)
        partner = None
        if side is not None:
            other = "B" if side.group(1) == "A" else "A"
            partner = by_name.get(name[: side.start(1)] + other + name[side.end(1):])
        # one read-back per pair, once, when training begins
        needs.append(2 if partner is not None and not bool(partner.detach().any()) else 1)
    return needs
