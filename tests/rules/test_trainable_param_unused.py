"""trainable-param-unused: trainable params that took no part in the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.builders import (TinyLM, assert_fires, assert_healthy, assert_silent, base, batch, custom_lora, lora,
                                    lora_config, probe, tiny_batch, tiny_lm, value_head_lm)
from tests.helpers.peft_methods import adapted, first_layer_without_grad
from tests.helpers.vlm import VISION_LORA, tiny_llava, vlm_batch

SLUG = "trainable-param-unused"


class WithAuxHead(TinyLM):
    """A custom LM with a value head that the LM-loss forward never calls."""

    def __init__(self):
        super().__init__()
        self.value_head = nn.Linear(16, 1)


def test_head_added_to_the_base_model_after_get_peft_model():
    """A head attached to the transformers model under PEFT (whose forward PEFT calls directly) and never used."""
    model = lora("tiny-phi3")
    model.get_base_model().extra_head = nn.Linear(64, 64)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.extra_head")
    assert sorted(finding.params) == ["base_model.model.extra_head.bias", "base_model.model.extra_head.weight"]


def test_custom_head_never_called():
    model = WithAuxHead()
    model.requires_grad_(False)
    model.value_head.requires_grad_(True)
    model.blocks.requires_grad_(True)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="value_head")
    assert sorted(finding.params) == ["value_head.bias", "value_head.weight"]


def test_layers_dropped_through_config_keep_their_adapters():
    """num_hidden_layers lowered after loading: the forward skips the last layers, whose LoRA still 'trains'."""
    model = lora()
    model.config.num_hidden_layers = 2
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.2")
    assert "base_model.model.model.layers.3" in finding.message
    assert all(".layers.2." in p or ".layers.3." in p for p in finding.params)
    assert len(finding.params) == 2 * 2 * 7  # two layers x seven targets x (A, B)


def test_embedding_adapter_bypassed_by_inputs_embeds():
    """LoRA on embed_tokens, but the batch passes inputs_embeds: the embedding and its adapter never run."""
    model = lora(target_modules=["embed_tokens", "q_proj", "v_proj"])
    data = batch(model)
    ids = data.pop("input_ids")
    data["inputs_embeds"] = torch.nn.functional.embedding(ids, model.get_input_embeddings().weight)
    report = probe(model, data)
    finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens")
    assert all("embed_tokens" in p for p in finding.params)


def test_module_swapped_out_of_the_forward_but_kept_in_modules_to_save():
    """A head replaced in the forward but still listed in modules_to_save: PEFT makes a trainable copy of it."""
    model = tiny_lm()
    model.spare = nn.Linear(16, 16)
    model.requires_grad_(False)
    model = custom_lora(model, targets=("proj",), modules_to_save=["spare"])
    report = probe(model, tiny_batch())
    assert_fires(report, SLUG, location="base_model.model.spare")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_for_experts_the_router_did_not_pick():
    """MoE: experts not routed in this batch are not a fault (a sibling expert ran)."""
    model = lora("tiny-mixtral")
    ids = torch.full((1, 8), 7)  # one repeated token: layer 0 routes every position to the same experts
    report = probe(model, {"input_ids": ids, "labels": ids.clone()})
    assert_silent(report, SLUG)
    idle = [m.name for m in report.snapshot.modules if ".experts." in m.name and m.ran is False]
    from tests.helpers.builders import STACK

    if STACK == "old":  # 4.57 has one module per expert; 5.x fuses them into one module
        assert idle, "the batch was meant to leave some experts unrouted"


def test_silent_for_frozen_modules_that_never_run():
    model = WithAuxHead()
    model.requires_grad_(False)
    model.blocks.requires_grad_(True)
    assert_silent(probe(model, tiny_batch()), SLUG)


def test_silent_when_the_model_never_ran():
    """The loss skipped the model: loss-detached says so; listing every parameter as unused would be noise."""
    model = lora()
    report = probe(model, batch(model), loss_fn=lambda m, d: torch.tensor(1.0, requires_grad=True) * 2)
    assert_silent(report, SLUG)
    assert_fires(report, "loss-detached")


def test_silent_for_a_fresh_lora():
    from peft import get_peft_model

    model = get_peft_model(base("tiny-gpt2"), lora_config())
    assert_silent(probe(model, batch(model)), SLUG)


class CachedProjections(TinyLM):
    """Caches its projections in a plain list at init: after get_peft_model the forward still calls the old
    nn.Linear objects (now PEFT's base_layer), never the LoRA layers that replaced them."""

    def __init__(self):
        super().__init__()
        self._projs = [block.proj for block in self.blocks]

    def hidden(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for proj in self._projs:
            h = h + torch.nn.functional.gelu(proj(h))
        return h


def test_stale_reference_to_modules_peft_replaced():
    model = CachedProjections()
    model.requires_grad_(False)
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0.proj")
    assert "base_layer inside base_model.model.blocks.0.proj ran without it" in finding.message
    assert "stale reference" in finding.message
    assert len(finding.params) == 6 and all(".lora_" in p for p in finding.params)


# --- ran, but its output never reaches the loss (issue 18) ----------------------------------------------------------
def test_vision_tower_last_layer_runs_while_the_projector_reads_the_layer_before():
    """LLaVA reads vision layer -2 by default: LoRA on every linear layer trains the last vision layer for nothing."""
    model = lora(tiny_llava(), target_modules="all-linear")
    report = probe(model, vlm_batch())
    finding = assert_fires(report, SLUG)
    last = next(m.name for m in report.snapshot.modules if m.name.endswith("encoder.layers.1"))
    assert finding.location == last and "none of its outputs reaches the loss" in finding.message
    assert finding.params and all(p.startswith(last + ".") for p in finding.params)
    assert finding.fix.title == "Freeze it, or use its output"
    assert_silent(report, "graph-break", "grad-missing-unexplained")


def test_value_head_computed_and_never_used_by_the_loss():
    report = probe(value_head_lm(), tiny_batch())
    finding = assert_fires(report, SLUG, location="value_head")  # the outermost unused module, not each Linear
    assert sorted(finding.params) == ["value_head.0.bias", "value_head.0.weight", "value_head.2.bias",
                                      "value_head.2.weight"]
    assert_silent(report, "graph-break")


def test_silent_when_the_projector_reads_the_last_vision_layer():
    model = lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA)
    report = probe(model, vlm_batch())
    assert_silent(report, SLUG)
    assert_healthy(report)


def test_cli_factory_names_the_unused_vision_layer():
    from tests.helpers.cli import invoke
    from tests.helpers.env import REPO

    run = invoke("probe-backward", f"{REPO / 'tests/helpers/vlm.py'}:unused_layer_factory", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]  # a warning: exit 0 under the default --fail-on error
    (finding,) = [f for f in run.json()["findings"] if f["slug"] == SLUG]
    assert finding["location"].endswith("vision_tower.encoder.layers.1") or finding["location"].endswith(
        "vision_tower.vision_model.encoder.layers.1")
    assert finding["fix"]["title"] == "Freeze it, or use its output"
    clean = invoke("probe-backward", f"{REPO / 'tests/helpers/vlm.py'}:used_layer_factory", "--format", "json")
    assert clean.code == 0 and not [f for f in clean.json()["findings"] if f["severity"] != "info"], clean.stdout


# --- weights in an nn.ParameterDict run with the module that holds it ------------------------------------------------
@pytest.mark.parametrize("method", ["ia3", "vera"])
def test_parameter_dict_weights_of_skipped_layers(method):
    """The container (ia3_l, vera_lambda_*) is never called: the layers the forward skips are named, not it."""
    model = adapted(method)
    model.config.num_hidden_layers = 2
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.2")
    assert set(finding.params) == {n for n, p in model.named_parameters() if p.requires_grad
                                   and (".layers.2." in n or ".layers.3." in n)}


def test_silent_for_parameter_dict_weights_of_a_layer_run_under_no_grad():
    """IA3's ia3_l ran with its layer, under torch.no_grad(): graph-break, not 'never ran' at the container."""
    model = first_layer_without_grad(adapted("ia3"))
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert all(p.used for p in report.snapshot.params if p.requires_grad)
    assert_fires(report, "graph-break", location="base_model.model.model.layers.0.inner")
