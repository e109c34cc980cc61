"""packed-attention-leak (error): in a packed batch, one sample's loss has gradient w.r.t. another's input embeddings.

Kept boundaries give exactly zero cross-sample gradient, so the silent cases assert max_ratio == 0.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from gradflow.data.packing import collate_packed
from tests.helpers.builders import assert_fires, assert_silent, base, batch, enable_gc, lora, lora_config, probe

SLUG = "packed-attention-leak"


def packed(lengths=(9, 6, 11), vocab=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return collate_packed(rows)


def _leak(report):
    leak = report.snapshot.packed_leak
    assert leak is not None and leak.error is None, leak
    return leak


# --- fires ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_default_cache_without_checkpointing(impl):
    """A preset's config keeps use_cache=True; without checkpointing the forward builds a DynamicCache."""
    model = lora()
    model.get_base_model().set_attn_implementation(impl)
    assert model.config.use_cache is True
    report = probe(model, packed())
    finding = assert_fires(report, SLUG, location=None)
    assert f"attention ({impl})" in finding.message and "KV cache" in finding.message
    assert finding.fix.title == "Set model.config.use_cache = False for training"
    assert finding.fix.applicability == "display-only"
    leak = _leak(report)
    assert leak.causes == ["cache"] and leak.cache_created and leak.checked == 2 and len(leak.leaks) == 2
    assert model.config.use_cache is True  # measured as found, left as found


def test_collator_adds_an_all_ones_attention_mask():
    model = lora("tiny-phi3")
    model.config.use_cache = False
    data = packed((7, 12))
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    finding = assert_fires(probe(model, data), SLUG, location=None)
    assert "attention_mask" in finding.message and "(sdpa)" in finding.message
    assert finding.fix.title.startswith("Drop attention_mask from packed batches")


def test_attention_implementation_without_a_mask_function():
    """A custom attention registered with transformers: no mask function, so no mask at all (plain causal)."""
    from transformers import AttentionInterface

    AttentionInterface.register("gf_plain_causal", AttentionInterface._global_mapping["sdpa"])
    model = base()
    model.config.use_cache = False
    model.config._attn_implementation = "gf_plain_causal"
    model = get_peft_model(model, lora_config())
    report = probe(model, packed())
    finding = assert_fires(report, SLUG, location=None)
    assert "attention (gf_plain_causal)" in finding.message
    assert "does not derive sample boundaries" in finding.message
    assert _leak(report).causes == ["implementation"]


class CausalSelfAttentionLM(nn.Module):
    """A user's own model: causal self-attention over the whole row; it accepts position_ids and ignores them."""

    def __init__(self, vocab=64, dim=16, respect_boundaries=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)
        self.respect = respect_boundaries

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels=None, position_ids=None):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        t = input_ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        if self.respect and position_ids is not None:
            seg = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1) != 1).cumsum(-1)
            mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
        h = h + nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)[:, 0]
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def test_own_model_whose_attention_ignores_position_ids():
    model = CausalSelfAttentionLM()
    report = probe(model, packed(vocab=64))
    finding = assert_fires(report, SLUG, location=None)
    assert "attention (unknown)" in finding.message
    assert _leak(report).causes == ["implementation"]


# --- stays silent -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_silent_with_use_cache_off(impl):
    model = lora()
    model.get_base_model().set_attn_implementation(impl)
    model.config.use_cache = False
    report = probe(model, packed())
    assert_silent(report, SLUG)
    leak = _leak(report)
    assert leak.checked == 2 and leak.max_ratio == 0.0 and leak.attn_implementation == impl


def test_silent_under_checkpointing_with_the_config_cache_on():
    """transformers turns the cache off under checkpointing in train mode, so the packed mask holds."""
    model = get_peft_model(enable_gc(base("tiny-phi3"), reentrant=False), lora_config())
    assert model.config.use_cache is True
    report = probe(model, packed((5, 8, 4, 10)))
    assert_silent(report, SLUG)
    assert _leak(report).checked == 3 and _leak(report).max_ratio == 0.0


def test_silent_under_reentrant_checkpointing_and_grads_put_back():
    """A reentrant checkpoint refuses autograd.grad: measured with .backward(), the probe's own grads kept."""
    model = enable_gc(base(), reentrant=True)
    report = probe(model, packed())
    assert_silent(report, SLUG)
    leak = _leak(report)
    assert leak.checked == 2 and leak.max_ratio == 0.0
    assert report.params["with_grad"] == report.params["trainable"] > 0
    assert all(p.grad is None for p in model.parameters())


def test_silent_full_finetune_gpt2_with_learned_positions():
    model = base("tiny-gpt2")
    model.config.use_cache = False
    report = probe(model, packed())
    assert_silent(report, SLUG)
    assert _leak(report).max_ratio == 0.0


def test_silent_own_model_that_masks_by_position_ids():
    report = probe(CausalSelfAttentionLM(respect_boundaries=True), packed(vocab=64))
    assert_silent(report, SLUG)
    assert _leak(report).max_ratio == 0.0


def test_not_measured_on_an_unpacked_batch():
    model = lora()
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.snapshot.packed_leak is None


def test_measurement_leaves_the_model_as_found():
    model = lora()
    emb = model.get_input_embeddings()
    hooks = dict(emb._forward_hooks)
    model.eval()
    probe(model, packed())
    assert not model.training and model.config.use_cache is True
    assert dict(emb._forward_hooks) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_cli_packed_probe(tmp_path):
    """probe-backward --packed: a preset is built ready to train and keeps boundaries (the README's example); a
    model with transformers' default use_cache leaks (exit 1, GF123); --gc non-reentrant keeps boundaries."""
    import json

    from typer.testing import CliRunner

    from gradflow.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["probe-backward", "tiny-llama", "--packed", "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    assert "packed: 2 samples in 1 row, attention sdpa: boundaries hold" in res.stdout
    factory = tmp_path / "cached.py"
    factory.write_text("from gradflow.setup.build import apply_lora\n"
                       "from gradflow.setup.presets import build_preset\n\n\n"
                       "def build():  # transformers' default config: use_cache on\n"
                       "    return apply_lora(build_preset('tiny-llama'), 8, 16, 'all-linear')\n")
    res = runner.invoke(app, ["probe-backward", f"{factory}:build", "--packed", "--seq-len", "16", "--format", "json"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    assert [f["code"] for f in data["findings"] if f["slug"] == SLUG] == ["GF123"]
    check = data["packed_check"]
    assert check["causes"] == ["cache"] and check["samples"] == 2 and check["attn_implementation"] == "sdpa"
    res = runner.invoke(app, ["probe-backward", f"{factory}:build", "--packed", "--seq-len", "16", "--batch-size", "3",
                              "--gc", "non-reentrant"])
    assert res.exit_code == 0, res.output
    assert "packed: 3 samples in 1 row, attention sdpa: boundaries hold" in res.stdout
    res = runner.invoke(app, ["probe-backward", "tiny-llama", "--packed", "--batch-size", "1"])
    assert res.exit_code == 2 and "--packed needs at least 2 samples" in res.output
