"""requires-grad-changed: trainable parameters whose requires_grad went off during the step."""

from __future__ import annotations

import torch

from tests.helpers.builders import (assert_fires, assert_healthy, assert_silent, batch, custom_lora, lora,
                                    lora_config, probe, tiny_batch, tiny_lm)

SLUG = "requires-grad-changed"


def _two_adapters():
    model = lora()
    model.add_adapter("judge", lora_config())
    model.set_adapter("default")  # training starts on 'default': its weights trainable, 'judge' frozen
    return model


def _freeze(module, args):
    """A 'freeze' hook left in from an experiment (returns None: the inputs and output stay as they are)."""
    module.requires_grad_(False)


def _loss_switching_adapter(model, data):
    """A compute_loss that switches to the judge adapter before its forward."""
    model.set_adapter("judge")
    return model(**data).loss


def test_fires_when_the_loss_switches_the_adapter():
    model = _two_adapters()
    report = probe(model, batch(model), loss_fn=_loss_switching_adapter)
    finding = assert_fires(report, SLUG)
    assert "set_adapter" in finding.message and "default" in finding.message and "judge" in finding.message
    assert finding.params and all(".default." in p for p in finding.params)
    assert finding.fix.applicability == "display-only"
    assert_silent(report, "graph-break", "loss-detached", "grad-missing-unexplained")


def test_fires_on_a_forward_pre_hook_that_freezes_a_layer():
    model = lora()
    layer = model.get_base_model().model.layers[1]
    layer.register_forward_pre_hook(_freeze)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1")
    assert "forward pre-hook" in finding.message
    assert finding.params and all(".layers.1." in p for p in finding.params)
    assert_silent(report, "graph-break", "grad-missing-unexplained")


def test_fires_on_a_forward_hook_that_freezes_its_module():
    """The flag goes off after the module ran: this step's gradients arrive, the next steps' do not."""
    model = custom_lora(tiny_lm())
    block = model.get_base_model().blocks[0]
    block.register_forward_hook(lambda module, args, out: _freeze(module, args))
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0")
    assert "forward hook" in finding.message


def test_fires_when_a_hook_freezes_a_layer_and_the_loss_unfreezes_it():
    """Off for the forward, on again by the end of the loss: that layer's adapters still get no gradient."""
    model = lora()
    layer = model.get_base_model().model.layers[1]
    layer.register_forward_pre_hook(_freeze)

    def loss_fn(m, data):
        loss = m(**data).loss
        for name, p in layer.named_parameters():
            p.requires_grad_("lora_" in name)  # "make sure the adapters train"
        return loss

    report = probe(model, batch(model), loss_fn=loss_fn)
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1")
    assert "on again by the end of the loss" in finding.message
    assert_silent(report, "graph-break", "grad-missing-unexplained")


def test_fires_when_the_loss_freezes_every_parameter_before_the_forward():
    """requires_grad_(False) on the whole model inside compute_loss: the loss has no grad_fn."""
    model = lora()

    def loss_fn(m, data):
        m.requires_grad_(False)
        return m(**data).loss

    report = probe(model, batch(model), loss_fn=loss_fn)
    finding = assert_fires(report, SLUG)
    assert len(finding.params) == sum(p.requires_grad for p in report.snapshot.params)
    assert report.loss["requires_grad"] is False


# --- stays silent ------------------------------------------------------------------------------------------------
def test_silent_on_a_healthy_lora():
    model = lora()
    assert_healthy(probe(model, batch(model)))


def test_silent_when_the_loss_sets_the_adapter_already_active():
    model = _two_adapters()

    def loss_fn(m, data):
        m.set_adapter("default")
        return m(**data).loss

    report = probe(model, batch(model), loss_fn=loss_fn)
    assert_silent(report, SLUG)
    assert_healthy(report)


def test_silent_on_a_hook_that_freezes_a_frozen_module():
    model = lora(target_modules=["q_proj", "v_proj"])
    mlp = model.get_base_model().model.layers[0].mlp
    mlp.register_forward_pre_hook(_freeze)
    report = probe(model, batch(model))
    assert_healthy(report)


def test_probe_puts_the_flags_back():
    model = lora()
    layer = model.get_base_model().model.layers[1]
    handle = layer.register_forward_pre_hook(_freeze)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    probe(model, batch(model))
    handle.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert torch.is_grad_enabled()


def test_patch_advice_names_the_hook_and_its_file():
    import gradflow

    model = lora()
    model.get_base_model().model.layers[1].register_forward_pre_hook(_freeze)
    report = gradflow.patch(model, batch(model))
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["applicability"] == "display-only"
    assert "the hook _freeze at" in advice["changes"][0] and "test_requires_grad_changed.py" in advice["changes"][0]
