"""Padding-free packing: samples grouped into token-budget batches, one row each, boundaries kept by position ids.

A packed batch is one row `[1, T]` holding several samples back to back:
- `position_ids` restart at 0 for every sample, so rotary/learned positions are the unpacked ones;
- the first label of every sample is -100, so no sample is trained to predict across a boundary;
- there is no `attention_mask`: transformers' masking_utils (4.57 and 5.x) then derives a block-diagonal causal
  mask from the position ids (`find_packed_sequence_indices`). Tested on CPU for sdpa and eager on both stacks
  (tests/test_packing.py); by the source, flex_attention gets the same mask as a BlockMask, and flash_attention_2
  reads the boundaries from the position ids (varlen, one row per batch). CPU has no flex_attention backward and
  no flash-attn: bench/packing_paths_gpu.py checks those paths on a GPU.

When that path does not hold, attention silently crosses samples (measured on both stacks, tiny presets):
- the model builds a KV cache in the forward (`config.use_cache=True` and no gradient checkpointing; transformers
  only turns the cache off under checkpointing): with a cache present masking_utils skips the packed detection and
  the mask is plain causal across the whole row;
- the batch carries an `attention_mask` (even all ones): the detection runs only when the mask is None;
- the attention implementation has no mask function in transformers (a custom registered one), or the model's
  code does not build its mask through masking_utils.
`packing_blockers(model)` names the first two model-side causes before training; `gradflow.probing.leak` measures the
real thing (the `packed-attention-leak` finding).
"""

from __future__ import annotations

import bisect
import random

from gradflow.data.jsonl import collate
from gradflow.errors import GradflowError

IGNORE_INDEX = -100


def pack_groups(lengths: list[int], tokens_per_batch: int, *, seed: int | None = None) -> list[list[int]]:
    """Group sample indices into batches of at most `tokens_per_batch` tokens (best-fit decreasing).

    Longest samples are placed first, each into the fullest group it still fits; the result is deterministic for
    a given input. Inside a group indices are ascending. Groups come longest-first; with `seed` their order is
    shuffled (reproducibly) so that a run does not start on its longest samples.

    Raises:
        GradflowError: the budget is not positive, or a sample is empty or longer than the budget (a sample is
            never split or dropped: raise the budget to at least the longest sample, i.e. --seq-len).
    """
    if tokens_per_batch < 1:
        raise GradflowError(f"tokens per batch must be positive, got {tokens_per_batch}",
                            "Pass --tokens-per-batch 4096 (or another positive number)")
    for i, n in enumerate(lengths):
        if n < 1:
            raise GradflowError(f"sample {i} has no tokens; it cannot be packed", "Drop empty samples from the data")
        if n > tokens_per_batch:
            raise GradflowError(f"sample {i} has {n} tokens, more than the {tokens_per_batch} tokens per batch",
                                f"Pass --tokens-per-batch {n} or more (at least --seq-len), or a smaller --seq-len")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    # (room left, group index), kept sorted: the smallest room that still fits is the best fit
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, g = rooms.pop(at)
            groups[g].append(i)
            room -= n
        else:
            g, room = len(groups), tokens_per_batch - n
            groups.append([i])
        if room > 0:
            bisect.insort(rooms, (room, g))
    groups = [sorted(g) for g in groups]
    if seed is not None:
        random.Random(seed).shuffle(groups)
    return groups


def fill_rate(lengths: list[int], groups: list[list[int]], tokens_per_batch: int) -> float:
    """Real tokens over the tokens the groups could hold (1.0 is perfect packing)."""
    if not groups:
        return 1.0
    return sum(lengths[i] for g in groups for i in g) / (len(groups) * tokens_per_batch)


def collate_packed(rows: list[dict]) -> dict:
    """Rows with "input_ids" and "labels" (lists of ints, -100 where not supervised) → one packed batch.

    Returns `input_ids`, `labels` and `position_ids`, each a long tensor `[1, T]` with T the sum of the row
    lengths. Each sample's first label is -100 (the model shifts labels by one, so that label would be predicted
    from the previous sample's last token). No attention_mask: see the module docstring. Other keys are dropped.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i, row in enumerate(rows):
        x, y = list(row["input_ids"]), list(row.get("labels", row["input_ids"]))
        if len(x) != len(y):
            raise GradflowError(f"row {i} has {len(x)} input_ids but {len(y)} labels",
                                "Give every row labels of the same length as its input_ids")
        if not x:
            continue
        ids.extend(x)
        labels.append(IGNORE_INDEX)
        labels.extend(y[1:])
        positions.extend(range(len(x)))
    if not ids:
        raise GradflowError("nothing to pack: every row is empty", "Give collate_packed rows with input_ids")
    as_row = lambda v: torch.tensor(v, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


class PackedCollator:
    """A Trainer data_collator: one group of rows → one packed batch; counts the real tokens it has served."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        batch = collate_packed(rows)
        self.tokens += int(batch["input_ids"].shape[-1])  # every token of a packed row is real: no padding
        return batch


def segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its samples: a new one starts where a position is not the last + 1.

    The same rule as transformers' `find_packed_sequence_indices`, so the spans are the blocks it masks.
    """
    import torch

    pos = position_ids if isinstance(position_ids, torch.Tensor) else torch.as_tensor(position_ids)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    pos = pos.detach().to("cpu", torch.long)
    out = []
    for row in pos.tolist():
        starts = [0] + [t for t in range(1, len(row)) if row[t] - row[t - 1] != 1]
        out.append([(a, b) for a, b in zip(starts, starts[1:] + [len(row)])])
    return out


def is_packed(batch) -> bool:
    """Whether a batch is packed: its position_ids restart inside a row, between two real (unpadded) tokens.

    Left-padded generation-style position ids ([1, 1, 0, 1, 2] with a mask [0, 0, 1, 1, 1]) are not packing.
    """
    import torch

    pos = batch.get("position_ids") if hasattr(batch, "get") else None
    if not isinstance(pos, torch.Tensor) or pos.dim() not in (1, 2) or pos.shape[-1] < 2:
        return False
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    restart = torch.diff(pos, dim=-1) != 1
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] == pos.shape[-1]:
        real = mask.to(pos.device).bool()
        restart = restart & real[:, 1:] & real[:, :-1]
    return bool(restart.any())


def supervised_tokens(batch) -> int:
    """Tokens that count in the loss (labels after the model's one-token shift that are not -100)."""
    labels = batch["labels"]
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_of(rows: list[dict], *, packed: bool, pad_id: int = 0, device=None) -> dict:
    """Encoded rows as one batch on `device`: packed into one row (position ids restarting per sample, no
    attention mask), or padded to the longest row with an attention mask."""
    batch = collate_packed(rows) if packed else collate(rows, pad_id)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
