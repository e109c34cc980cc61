"""lora-zero-init (info): lora_A's first gradient is exactly zero because lora_B starts at zero."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from tests.helpers.builders import (Block, assert_fires, assert_silent, base, batch, lora, lora_config, probe,
                                    save_adapter_and_reload, tiny_batch, tiny_lm)
from tests.helpers.gates import gated_llama
from tests.helpers.peft_methods import adapted

SLUG = "lora-zero-init"


def _assert_expected_zero(report, location: str):
    finding = assert_fires(report, SLUG, severity="info", location=location)
    assert not report.fails("error") and not report.fails("warning")
    assert finding.fix is None  # nothing to fix
    zero_a = {p.name for p in report.snapshot.params if p.requires_grad and ".lora_A." in p.name and p.grad == "zero"}
    assert set(finding.params) == zero_a and zero_a
    assert all(p.grad == "ok" for p in report.snapshot.params if p.requires_grad and ".lora_B." in p.name)
    return finding


def test_fresh_lora():
    model = lora()
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default")


def test_fresh_lora_on_gpt2_conv1d():
    model = lora("tiny-gpt2")
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.transformer.h.0.attn.c_attn.lora_A.default")


def test_untrained_adapter_reloaded_trainable(tmp_path):
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=True)
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_after_one_optimizer_step():
    model = lora()
    data = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**data).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    report = probe(model, data, optimizer=optimizer)
    assert_silent(report, SLUG)
    assert all(p.grad == "ok" for p in report.snapshot.params if p.requires_grad)


def test_silent_without_zero_init():
    model = get_peft_model(base(), lora_config(init_lora_weights=False))
    report = probe(model, batch(model))
    assert_silent(report, SLUG)


def test_silent_for_a_frozen_adapter(tmp_path):
    """No gradient at all is adapter-frozen's business, not an expected zero."""
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=False)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert_fires(report, "adapter-frozen")


def test_an_embedding_adapter_names_its_own_zero_weight():
    """On an embedding PEFT starts lora_embedding_A at zero, so lora_embedding_B's first gradient is the zero one:
    the message names the weights as they are, beside the Linear adapters' lora_A."""
    model = lora(target_modules=["q_proj", "embed_tokens"])
    finding = assert_fires(probe(model, batch(model)), SLUG, severity="info")
    zero_b = [n for n in finding.params if ".lora_embedding_B." in n]
    assert zero_b == ["base_model.model.model.embed_tokens.lora_embedding_B.default"]
    assert finding.message == (
        "4 lora_A weights (first at base_model.model.model.layers.0.self_attn.q_proj.lora_A.default) and 1 "
        "lora_embedding_B weight (first at base_model.model.model.embed_tokens.lora_embedding_B) got an exactly-zero "
        "first gradient because lora_B and lora_embedding_A start at zero (expected; they move from the second step)")


# --- PEFT's other methods that start a weight at zero ---------------------------------------------------------------
def test_vera_lambda_d_behind_vera_lambda_b():
    """VeRA starts vera_lambda_b at zero (reset_vera_parameters), so vera_lambda_d's first gradient is zero."""
    model = adapted("vera")
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, severity="info", location="base_model.model.model.layers.0.self_attn.q_proj")
    assert not report.fails("warning")
    assert set(finding.params) == {n for n, _ in model.named_parameters() if ".vera_lambda_d." in n}
    assert finding.message == (
        "8 vera_lambda_d weights (first at base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d) got an "
        "exactly-zero first gradient because vera_lambda_b starts at zero (expected; they move from the second step)")


def test_adalora_lora_a_and_b_behind_lora_e():
    """AdaLoRA starts lora_E at zero, so lora_A and lora_B both get a zero first gradient. A loop that computes the
    loss from the logits itself skips the orthogonality penalty AdaLoraModel adds to a model-computed loss (which
    gives them a gradient of its own; peft 0.18 refuses orth_reg_weight=0)."""
    def loss_fn(model, data):
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten())

    model = adapted("adalora")
    report = probe(model, batch(model), loss_fn=loss_fn)
    finding = assert_fires(report, SLUG, severity="info")
    assert not report.fails("warning")
    assert set(finding.params) == {n for n, p in model.named_parameters() if p.requires_grad and ".lora_E." not in n}
    assert "lora_A weights" in finding.message and "lora_B weights" in finding.message
    assert "because lora_E starts at zero" in finding.message


def test_silent_for_vera_without_zero_init():
    model = adapted("vera", init_weights=False)
    assert_silent(probe(model, batch(model)), SLUG)


# --- a zero-initialized gate in the user's own adapter --------------------------------------------------------------
class ReZeroBlock(Block):
    """ReZero: x + alpha * branch(x), alpha a trainable scalar that starts at zero."""

    def __init__(self, dim=16):
        super().__init__(dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * self.act(self.proj(x))


def test_zero_gate_around_an_adapter():
    model = gated_llama()
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, severity="info", location="model.layers.0.mlp.down")
    assert not report.fails("warning")
    zero = {p.name for p in report.snapshot.params if p.requires_grad and p.grad == "zero"}
    assert set(finding.params) == zero == {n for n, _ in model.named_parameters() if ".down." in n or ".up." in n}
    assert "model.layers.0.mlp.gate" in finding.message and "gates or scales that start at zero" in finding.message


def test_rezero_scalar_of_a_block():
    model = tiny_lm(block=ReZeroBlock, freeze=False)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, severity="info")
    assert not report.fails("warning")
    assert finding.params and all(".proj." in n for n in finding.params)


def test_silent_for_a_healthy_lora_reads_no_values():
    """Only lora_A's expected zeros: the probe does not read parameter values for a gate."""
    model = lora()
    report = probe(model, batch(model))
    assert report.snapshot.zero_valued == []
    assert "gate" not in assert_fires(report, SLUG).message
