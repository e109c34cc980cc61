"""loss-term-no-grad: a term added to the loss was computed from model outputs under no_grad or from a detached copy."""

from __future__ import annotations

import copy
import os
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe, tiny_batch, tiny_lm
from tests.helpers.cli import invoke

SLUG = "loss-term-no-grad"
HERE = os.path.basename(__file__)


def _kl(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits, -1), F.softmax(teacher_logits, -1), reduction="batchmean")


def _fires(report, *phrases):
    finding = assert_fires(report, SLUG, location=None)
    for phrase in phrases:
        assert phrase in finding.message, finding.message
    assert finding.fix is not None and "autograd on" in finding.fix.title
    # the main loss trains: nothing else is wrong with the model
    assert_silent(report, "loss-detached", "graph-break", "trainable-param-unused")
    return finding


# --- fires ----------------------------------------------------------------------------------------------------------
def test_distillation_term_computed_under_no_grad():
    model = lora()
    teacher = copy.deepcopy(model)

    def loss_fn(m, data):
        out = m(**data)
        with torch.no_grad():
            t = teacher(input_ids=data["input_ids"]).logits
            kd = _kl(out.logits, t)  # the student's logits too: kd has no gradient
        return out.loss + 0.5 * kd

    finding = _fires(probe(model, batch(model), loss_fn=loss_fn), "under torch.no_grad()", f"{HERE}:")
    # where it was added (the return line) and where it lost its gradient (inside _kl), both in this file
    added, computed = (int(n) for n in re.findall(rf"{HERE}:(\d+)", finding.message))
    assert added > computed


def test_auxiliary_term_from_detached_hidden_states():
    model = lora()

    def loss_fn(m, data):
        out = m(**data, output_hidden_states=True)
        aux = out.hidden_states[-1].detach().pow(2).mean()  # a feature penalty that cannot train anything
        return out.loss + 0.1 * aux

    _fires(probe(model, batch(model), loss_fn=loss_fn), ".detach()")


def test_term_from_data_of_a_custom_model_output_summed_in_a_stack():
    model = tiny_lm(freeze=False)

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"])["logits"]
        main = F.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten())
        entropy = -(F.softmax(logits.data, -1) * F.log_softmax(logits.data, -1)).sum(-1).mean()
        return torch.stack([main, 0.01 * entropy]).sum()

    _fires(probe(model, tiny_batch(), loss_fn=loss_fn), ".data")


def test_two_terms_without_gradient_are_counted():
    model = lora()

    def loss_fn(m, data):
        out = m(**data)
        logits = out.logits.detach()
        return out.loss + logits.pow(2).mean() - 0.1 * logits.abs().mean()

    _fires(probe(model, batch(model), loss_fn=loss_fn), "1 more term")


def _line_of(fn, code: str) -> int:
    """The line in this file where `code` appears inside `fn`."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if code in line)


def test_kl_to_a_reference_names_the_detach_of_the_policy_not_the_reference_no_grad():
    """The reference run under no_grad is meant; the policy's .detach() (a later line) is why the KL has no grad."""
    model = lora()

    def loss_fn(m, data):
        out = m(**data)
        with torch.no_grad():
            with m.disable_adapter():
                ref = m(input_ids=data["input_ids"]).logits
        pol = out.logits.detach().float()
        kl = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(pol, -1), log_target=True, reduction="batchmean")
        return out.loss + 0.1 * kl

    finding = _fires(probe(model, batch(model), loss_fn=loss_fn), "from a .detach()ed copy of the model output")
    assert f"{HERE}:{_line_of(loss_fn, 'pol = out.logits.detach()')})" in finding.message, finding.message
    assert f"/{HERE}:{_line_of(loss_fn, 'return out.loss + 0.1 * kl')} has" in finding.message


def test_term_from_a_second_forward_under_no_grad_reads_as_a_sentence():
    model = lora()

    def loss_fn(m, data):
        out = m(**data)
        with torch.no_grad():
            again = m(input_ids=data["input_ids"]).logits
        return out.loss + 0.01 * again.pow(2).mean()

    finding = _fires(probe(model, batch(model), loss_fn=loss_fn))
    line = _line_of(loss_fn, "again = m(")
    said = f"it was computed from a {type(model).__name__} output made under torch.no_grad() (at "
    assert said in finding.message and f"{HERE}:{line})" in finding.message, finding.message


# --- stays silent ---------------------------------------------------------------------------------------------------
def test_silent_on_distillation_with_only_the_teacher_under_no_grad():
    model = lora()
    teacher = copy.deepcopy(model)

    def loss_fn(m, data):
        out = m(**data)
        with torch.no_grad():
            t = teacher(input_ids=data["input_ids"]).logits
        return out.loss + 0.5 * _kl(out.logits, t)

    assert_silent(probe(model, batch(model), loss_fn=loss_fn), SLUG)


def test_silent_on_the_usual_constants():
    """A scalar weight, loss scaling, a division by the supervised-token count, a constant tensor."""
    model = lora()

    def loss_fn(m, data):
        out = m(**data)
        num_items_in_batch = (data["labels"][:, 1:] != -100).sum()
        scale = torch.tensor(2.0)
        return 0.5 * (out.loss * scale) * num_items_in_batch / num_items_in_batch + torch.tensor(0.1)

    assert_silent(probe(model, batch(model), loss_fn=loss_fn), SLUG)


def test_silent_on_detached_weights_and_metrics():
    """A stop-gradient factor (focal weight) still lets the loss train; a metric under no_grad is not added."""
    model = tiny_lm(freeze=False)
    metrics = []

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"])["logits"][:, :-1].flatten(0, 1)
        labels = data["labels"][:, 1:].flatten()
        ce = F.cross_entropy(logits, labels, reduction="none")
        weight = (1 - torch.exp(-ce.detach())) ** 2
        with torch.no_grad():
            metrics.append((logits.argmax(-1) == labels).float().mean())  # logged, not added to the loss
        return (weight * ce).mean() + (ce - ce.detach()).mean() * 0  # a zero shift: grad flows through ce

    assert_silent(probe(model, tiny_batch(), loss_fn=loss_fn), SLUG)


def test_silent_when_the_whole_loss_is_detached():
    """loss-detached names the bigger fault; this finding would only repeat it."""
    model = lora()

    def loss_fn(m, data):
        logits = m(**data).logits.detach()
        zero = sum(p.sum() for p in m.parameters() if p.requires_grad) * 0.0
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten()) + zero

    report = probe(model, batch(model), loss_fn=loss_fn)
    assert_fires(report, "loss-detached")
    assert_silent(report, SLUG)


# --- the CLI: a factory with a loss_fn ------------------------------------------------------------------------------
_FACTORY = '''
import torch
from peft import LoraConfig, get_peft_model
from gradflow.setup.presets import build_preset

def _model():
    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))

ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))

def aux_loss(model, batch):
    out = model(**batch, output_hidden_states=True)
    aux = out.hidden_states[-1].detach().pow(2).mean()
    return out.loss + 0.1 * aux

def scaled_loss(model, batch):
    return model(**batch).loss * 4.0 / 2

def broken():
    return {"model": _model(), "batch": {"input_ids": ids, "labels": ids}, "loss_fn": aux_loss}

def healthy():
    return {"model": _model(), "batch": {"input_ids": ids, "labels": ids}, "loss_fn": scaled_loss}
'''


@pytest.mark.parametrize("factory", ["broken", "healthy"])
def test_cli_factory_with_a_loss_fn(tmp_path, factory):
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent(_FACTORY))
    run = invoke("probe-backward", f"{path}:{factory}", "--format", "json")
    slugs = [f["slug"] for f in run.json()["findings"]]
    if factory == "broken":
        assert run.code == 0 and SLUG in slugs, slugs  # a warning: exit 0 unless --fail-on warning
        (finding,) = [f for f in run.json()["findings"] if f["slug"] == SLUG]
        assert "factory.py:15 has" in finding["message"] and "factory.py:14)" in finding["message"], finding
        assert invoke("probe-backward", f"{path}:{factory}", "--fail-on", "warning").code == 1
    else:
        assert run.code == 0 and SLUG not in slugs, slugs
