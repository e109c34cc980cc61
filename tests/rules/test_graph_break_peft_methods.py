"""graph-break for PEFT methods whose weights live in nn.ParameterDict (IA3, VeRA, AdaLoRA, LoRA on an embedding):
the container is never called, so its weights run, and are cut, with the module that holds it."""

from __future__ import annotations

import pytest

from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe
from tests.helpers.peft_methods import NoGradPrefix, adapted, first_layer_without_grad

SLUG = "graph-break"
LAYER0 = "base_model.model.model.layers.0"


def _trainable(model, part: str) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and part in n}


@pytest.mark.parametrize("method", ["ia3", "vera", "adalora"])
def test_fires_at_a_layer_run_under_no_grad(method):
    """Layer 0 under torch.no_grad(): its adapter vectors get no gradient; they ran, inside the layer. (AdaLoRA's
    lora_A / lora_B still get one from its orthogonality penalty, added to the loss outside the layers.)"""
    model = first_layer_without_grad(adapted(method))
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=f"{LAYER0}.inner")
    assert "no_grad" in finding.message
    lost = {p.name for p in report.snapshot.params if p.requires_grad and p.grad == "none"}
    layer0 = _trainable(model, ".layers.0.")
    assert set(finding.params) == lost
    assert lost == ({n for n in layer0 if ".lora_E." in n} if method == "adalora" else layer0) and lost
    assert_silent(report, "trainable-param-unused", "grad-missing-unexplained")


def test_fires_at_an_embedding_with_lora_run_under_no_grad():
    """LoRA on embed_tokens (lora_embedding_A/B are ParameterDicts), the embedding called under torch.no_grad()."""
    model = lora(target_modules=["embed_tokens", "q_proj"])
    inner = model.get_base_model().model
    inner.embed_tokens = NoGradPrefix(inner.embed_tokens)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens.inner")
    assert set(finding.params) == _trainable(model, ".lora_embedding_")
    assert_silent(report, "trainable-param-unused")
