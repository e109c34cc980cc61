"""step-raised: a forward, loss or backward that raises is an error finding (a CI gate must fail on it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradflow
from gradflow.forward import synthetic_batch
from tests.helpers.builders import lora


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        raise RuntimeError("shape mismatch in my custom block")


def _only(report, slug):
    got = [f for f in report.findings if f.slug == slug]
    assert len(got) == 1, report.findings
    return got[0]


def test_forward_that_raises_is_an_error():
    report = gradflow.probe(Exploding(), torch.randn(2, 4))
    f = _only(report, "step-raised")
    assert f.severity == "error" and f.code == "GF150"
    assert "the forward raised RuntimeError: shape mismatch in my custom block" in f.message
    assert report.fails("error")
    assert report.loss["error_phase"] == "forward"
    assert not [x for x in report.findings if x.slug == "trainable-param-unused"]  # no follow-on noise


def test_loss_fn_returning_a_non_scalar_is_an_error():
    model = lora("tiny-llama")
    report = gradflow.probe(model, synthetic_batch(model), loss_fn=lambda m, b: m(**b).logits)
    f = _only(report, "step-raised")
    assert "reading the loss raised" in f.message and "not a scalar" in f.message
    assert report.fails("error")


def test_silent_on_a_healthy_lora():
    model = lora("tiny-llama")
    report = gradflow.probe(model, synthetic_batch(model))
    assert "step-raised" not in report.slugs()
    assert report.loss["error"] is None


# --- --steps K: each step gets its own copy of the batch, and a step that raises is named as such ----------------
def _pop_loss(model, inputs):
    """A compute_loss-style loss that takes its own key out of the batch, as Trainer subclasses often do."""
    targets = inputs.pop("target_ids")
    return model(input_ids=inputs["input_ids"], labels=targets).loss


def test_silent_on_a_loss_that_pops_keys_with_steps():
    model = lora("tiny-llama")
    data = synthetic_batch(model)
    data = {"input_ids": data["input_ids"], "target_ids": data["labels"]}
    report = gradflow.probe(model, data, loss_fn=_pop_loss, steps=3)
    assert not [f for f in report.findings if f.severity == "error"], report.findings
    run = report.snapshot.steps
    assert run.error is None and len(run.losses) == 3 and all(p.changed for p in run.params)
    assert set(data) == {"input_ids", "target_ids"}  # the caller's batch is left as given


def test_a_later_step_that_raises_is_step_raised_not_a_frozen_parameter():
    model = lora("tiny-llama")
    calls = []

    def flaky(m, data):
        calls.append(1)
        if len(calls) == 3:  # the probe's step, then --steps 1 and 2: the second step raises
            raise KeyError("target_ids")
        return m(**data).loss

    report = gradflow.probe(model, synthetic_batch(model), loss_fn=flaky, steps=3)
    f = _only(report, "step-raised")
    assert f.message == "the forward of step 2 of 3 (--steps, AdamW) raised KeyError: 'target_ids'", f.message
    assert "unfreeze" not in f.fix.title.lower()
    assert not [x for x in report.findings if x.slug in ("param-not-updated", "intended-param-frozen")]
    assert report.fails("error")


@pytest.mark.slow
def test_silent_on_a_trainer_whose_compute_loss_pops_keys(tmp_path):
    """`probe(trainer, steps=3)` on a Trainer subclass that pops its own key: trains fine, and gradflow agrees."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class PopTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            targets = inputs.pop("target_ids")
            outputs = model(input_ids=inputs["input_ids"], labels=targets)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    ids = [[5, 6, 7, 8, 9, 10]] * 4
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False)
    trainer = PopTrainer(model=lora("tiny-llama"), args=args,
                         train_dataset=Dataset.from_dict({"input_ids": ids, "target_ids": ids}))
    report = gradflow.probe(trainer, steps=3)
    assert not [f for f in report.findings if f.severity == "error"], report.findings
    assert report.snapshot.steps.error is None and len(report.snapshot.steps.losses) == 3
