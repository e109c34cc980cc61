"""Padding-free packing: grouping, collation, and a packed batch's loss and gradients equal to the padded ones.

Exactness tolerance (fp32, CPU): loss and every gradient within rtol=1e-4, atol=1e-6 of the per-sample padded
computation (same samples right-padded with an attention_mask, the same supervised-token normalisation). The
differences come only from summation order inside attention and matmuls.
"""

from __future__ import annotations

import random

import pytest
import torch

from gradflow.data.jsonl import collate
from gradflow.errors import GradflowError
from gradflow.probing.leak import packing_blockers
from gradflow.data.packing import (PackedCollator, collate_packed, fill_rate, is_packed, pack_groups,
                              segments, supervised_tokens)
from gradflow.setup.presets import build_preset

RTOL, ATOL = 1e-4, 1e-6
LENGTHS = (9, 5, 12)


def _rows(lengths=LENGTHS, seed=0, prompt=2):
    """Rows like gradflow.data.jsonl.encode gives: the first `prompt` tokens unsupervised (-100)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


# ----- grouping -----------------------------------------------------------------------------------------------
def test_pack_groups_respects_budget_uses_every_sample_once_and_fills_well():
    rng = random.Random(0)
    lengths = [max(1, min(256, int(rng.lognormvariate(4, 0.8)))) for _ in range(500)]
    groups = pack_groups(lengths, 512)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 512 for g in groups)
    assert all(g == sorted(g) for g in groups)
    assert fill_rate(lengths, groups, 512) > 0.95
    assert pack_groups(lengths, 512) == groups  # deterministic
    shuffled = pack_groups(lengths, 512, seed=3)
    assert shuffled == pack_groups(lengths, 512, seed=3)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, groups))  # a reordering of the same groups


def test_pack_groups_small_cases():
    assert pack_groups([], 8) == []
    assert pack_groups([3, 5, 8, 2], 8) == [[2], [0, 1], [3]]  # 8 alone; 5+3; 2 left over
    assert pack_groups([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("lengths,budget,needle", [([3, 9], 8, "sample 1 has 9 tokens"), ([3, 0], 8, "no tokens"),
                                                   ([3], 0, "must be positive")])
def test_pack_groups_refuses(lengths, budget, needle):
    with pytest.raises(GradflowError, match=needle):
        pack_groups(lengths, budget)


# ----- collation ----------------------------------------------------------------------------------------------
def test_collate_packed_layout():
    rows = _rows()
    rows[0]["attention_mask"] = [1] * LENGTHS[0]  # extra keys are dropped
    batch = collate_packed(rows)
    total = sum(LENGTHS)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (1, total) and v.dtype == torch.long for v in batch.values())
    starts = [0, LENGTHS[0], LENGTHS[0] + LENGTHS[1]]
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    assert all(batch["labels"][0, s].item() == -100 for s in starts)
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert segments(batch["position_ids"]) == [[(0, 9), (9, 14), (14, 26)]]
    assert is_packed(batch)
    assert not is_packed({"position_ids": torch.arange(8)[None]})
    assert not is_packed({"input_ids": torch.zeros(1, 8)})
    # left padding with generation-style position ids is not packing; a mask of ones over packed rows still is
    left = {"position_ids": torch.tensor([[1, 1, 0, 1, 2]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    assert not is_packed(left)
    assert is_packed({**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    # supervised tokens: those after the one-token shift; the same count as the padded batch
    assert supervised_tokens(batch) == supervised_tokens(collate(rows, 0)) == sum(n - 2 for n in LENGTHS)


def test_packed_collator_counts_real_tokens():
    col = PackedCollator()
    col(_rows((4, 6)))
    col(_rows((5,)))
    assert col.tokens == 15


def test_collate_packed_refuses_mismatched_rows():
    with pytest.raises(GradflowError, match="3 input_ids but 2 labels"):
        collate_packed([{"input_ids": [5, 6, 7], "labels": [5, 6]}])


# ----- exactness ----------------------------------------------------------------------------------------------
def _model(preset, impl, mode, *, gc=False, use_cache=False):
    model = build_preset(preset, seed=1)
    model.set_attn_implementation(impl)
    model.config.use_cache = use_cache
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: lora_B random, so every LoRA gradient is non-zero and comparable
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss_and_grads(model, batch, n_items):
    model.zero_grad(set_to_none=True)
    out = model(**batch, num_items_in_batch=n_items)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _compare(model, rows):
    padded = collate(rows, 0)
    packed = collate_packed(rows)
    n_items = supervised_tokens(padded)
    assert supervised_tokens(packed) == n_items
    loss_pad, grads_pad = _loss_and_grads(model, padded, torch.tensor(n_items))
    loss_pack, grads_pack = _loss_and_grads(model, packed, torch.tensor(n_items))
    return (loss_pad, grads_pad), (loss_pack, grads_pack)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_packed_loss_and_grads_equal_padded(preset, impl, mode):
    model = _model(preset, impl, mode)
    assert packing_blockers(model) == []
    (loss_pad, grads_pad), (loss_pack, grads_pack) = _compare(model, _rows())
    torch.testing.assert_close(loss_pack, loss_pad, rtol=RTOL, atol=ATOL)
    assert grads_pack.keys() == grads_pad.keys() and grads_pad
    for name, g in grads_pad.items():
        assert g.abs().max() > 0 or "lm_head" in name, f"{name}: zero gradient, the comparison would be empty"
        torch.testing.assert_close(grads_pack[name], g, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_packed_exact_under_checkpointing_even_with_use_cache_on():
    # transformers turns the cache off under checkpointing in train mode (both stacks), so the packed mask holds
    model = _model("tiny-llama", "sdpa", "lora", gc=True, use_cache=True)
    assert packing_blockers(model) == []
    (loss_pad, grads_pad), (loss_pack, grads_pack) = _compare(model, _rows())
    torch.testing.assert_close(loss_pack, loss_pad, rtol=RTOL, atol=ATOL)
    for name, g in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], g, rtol=RTOL, atol=ATOL)


def test_packing_not_exact_with_a_cache_or_an_attention_mask():
    """Where packing must be refused: the mask silently becomes plain causal across the whole row."""
    model = _model("tiny-llama", "sdpa", "full", use_cache=True)  # no checkpointing: a DynamicCache is built
    assert packing_blockers(model) == ["cache"]
    (loss_pad, _), (loss_pack, _) = _compare(model, _rows())
    assert abs(float(loss_pack) - float(loss_pad)) > 1e-3

    model.config.use_cache = False
    rows = _rows()
    padded, packed = collate(rows, 0), collate_packed(rows)
    n = torch.tensor(supervised_tokens(padded))
    packed["attention_mask"] = torch.ones_like(packed["input_ids"])  # a collator that adds a mask of ones
    loss_pad, _ = _loss_and_grads(model, padded, n)
    loss_mask, _ = _loss_and_grads(model, packed, n)
    assert abs(float(loss_mask) - float(loss_pad)) > 1e-3
    del packed["attention_mask"]
    loss_ok, _ = _loss_and_grads(model, packed, n)
    torch.testing.assert_close(loss_ok, loss_pad, rtol=RTOL, atol=ATOL)


def test_packing_blockers_name_an_attention_implementation_without_a_mask_function():
    from transformers import AttentionInterface

    from gradflow.probing.leak import boundary_causes

    AttentionInterface.register("gf_plain_causal", AttentionInterface._global_mapping["sdpa"])
    model = _model("tiny-llama", "sdpa", "full")
    model.config._attn_implementation = "gf_plain_causal"
    assert packing_blockers(model) == ["implementation"]
    assert boundary_causes(model, attention_mask_given=True, cache_created=True) == ["cache", "attention-mask",
                                                                                     "implementation"]
