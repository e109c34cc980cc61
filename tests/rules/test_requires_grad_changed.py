"""requires-grad-changed: trainable parameters whose requires_grad went off during the step."""

from __future__ import annotations

import pytest
import torch

import gradflow
from tests.helpers.builders import (assert_fires, assert_healthy, assert_silent, base, batch, custom_lora, lora,
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
    assert "requires_grad went off in the loss function, before the model's forward" in finding.message


def test_fires_when_the_loss_freezes_the_head_before_the_forward():
    """'Only train the body', in compute_loss: the one head matrix went off before the model ran."""
    model = base()

    def loss_fn(m, data):
        m.lm_head.requires_grad_(False)
        return m(**data).loss

    finding = assert_fires(probe(model, batch(model), loss_fn=loss_fn), SLUG, location="lm_head")
    assert finding.message.startswith("1 trainable parameter in lm_head stopped requiring grad during the step: "
                                      "requires_grad went off in the loss function, before the model's forward")
    assert finding.message.endswith("; it gets no gradient: lm_head.weight"), finding.message


_DISABLED = "PEFT's disable_adapter() switched requires_grad off in {site}, before the model's forward"


def _with_trainable_norm():
    """LoRA plus a final norm the user unfroze: the loss keeps a grad_fn, so training runs without an error."""
    model = lora()
    model.get_base_model().model.norm.requires_grad_(True)
    return model


def _loss_under_disable_adapter(m, data):
    """The training forward inside disable_adapter(), meant for the reference: the adapters are frozen and bypassed."""
    with m.disable_adapter():
        out = m(**data)
    m(input_ids=data["input_ids"])  # the policy forward the user meant to train, unused
    return out.loss


def _loss_after_disable_adapter_layers(m, data):
    m.base_model.disable_adapter_layers()  # the same without the context manager: never enabled again
    return m(**data).loss


def test_names_disable_adapter_around_the_loss_forward():
    model = _with_trainable_norm()
    report = probe(model, batch(model), loss_fn=_loss_under_disable_adapter)
    finding = assert_fires(report, SLUG)
    assert _DISABLED.format(site="the loss function") in finding.message, finding.message
    assert "it was on again by the end of the loss" in finding.message  # the context's exit enables them again
    assert "disable_adapter()" in finding.fix.title
    assert sorted(finding.params) == sorted(p.name for p in report.snapshot.params if "lora_" in p.name)
    assert_silent(report, "grad-missing-unexplained")


def test_names_disable_adapter_layers_called_in_the_loss():
    model = _with_trainable_norm()
    report = probe(model, batch(model), loss_fn=_loss_after_disable_adapter_layers)
    finding = assert_fires(report, SLUG)
    assert _DISABLED.format(site="the loss function") in finding.message, finding.message
    assert "on again" not in finding.message


@pytest.mark.slow  # a real Trainer
def test_names_disable_adapter_in_a_trainers_compute_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class AnchorTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = _loss_under_disable_adapter(model, inputs)
            return (loss, None) if return_outputs else loss

    ids = torch.randint(3, 500, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = AnchorTrainer(model=_with_trainable_norm(), args=args,
                            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    finding = assert_fires(gradflow.probe(trainer), SLUG)
    assert _DISABLED.format(site="AnchorTrainer.compute_loss") in finding.message, finding.message


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
    model = lora()
    model.get_base_model().model.layers[1].register_forward_pre_hook(_freeze)
    report = gradflow.patch(model, batch(model))
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["applicability"] == "display-only"
    assert "the hook _freeze at" in advice["changes"][0] and "test_requires_grad_changed.py" in advice["changes"][0]
