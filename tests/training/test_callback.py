"""GradFlowCallback in a user's own transformers.Trainer: healthy runs pass, broken states stop the run.

The broken states here appear during training; `preflight=False` keeps the pre-flight (tests/training/
test_preflight.py) from naming them before the first step, so that the runtime checks are what is tested.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import re

import pytest
import torch
from transformers import Trainer, TrainingArguments

from gradflow import GradFlowCallback
from gradflow.errors import GradflowError
from gradflow.setup.presets import build_preset
from gradflow.setup.build import apply_lora


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16, mask_all=False):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 512, (n, seq), generator=gen)
        self.mask_all = mask_all

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = torch.full_like(ids, -100) if self.mask_all else ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _run(tmp_path, model, callback, *, steps=6, lr=1e-3, dataset=None, **args):
    targs = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=steps,
                              learning_rate=lr, report_to="none", save_strategy="no", use_cpu=True,
                              disable_tqdm=True, logging_steps=1, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset or _Rows(), callbacks=[callback])
    trainer.train()
    return trainer


def _lora(seed=0):
    return apply_lora(build_preset("tiny-phi3", seed=seed), 4, 8, "all-linear")


@pytest.mark.slow
def test_healthy_run_records_per_layer_norms_and_no_finding(tmp_path):
    cb = GradFlowCallback(check_every=2, moved_at_step=3, tensorboard_dir=str(tmp_path / "tb"))
    trainer = _run(tmp_path, _lora(), cb)
    assert cb.findings == [] and cb.stopped_at is None
    assert trainer.state.global_step == 6
    assert [h["step"] for h in cb.history] == [1, 2, 4, 6]
    layers = cb.history[-1]["layers"]
    assert {"layers.0", "layers.3"} <= set(layers) and all(v > 0 and math.isfinite(v) for v in layers.values())
    assert cb.moved_checked and all(cb.moved().values())
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.slow
def test_nan_gradient_stops_the_run_at_the_first_check(tmp_path):
    model = _lora()
    target = next(p for n, p in model.named_parameters() if "layers.2" in n and "lora_B" in n)
    target.register_hook(lambda g: g * float("nan"))
    cb = GradFlowCallback(check_every=5, moved_at_step=None, preflight=False)
    trainer = _run(tmp_path, model, cb, steps=20)
    assert {f.slug for f in cb.findings} == {"nonfinite-grad"}
    # Trainer's gradient clipping spreads the NaN to every parameter; the probe on the last batch does not clip
    assert "clipping spreads" in cb.findings[0].message
    assert any("layers.2" in (f.location or "") for f in cb.findings[1:])
    assert cb.stopped_at == 1 and trainer.state.global_step == 1


def _detach_layer_1(model):
    # a graph break: layer 1's output is detached, so LoRA weights in layers 0-1 never get a gradient
    return model.base_model.model.model.layers[1].register_forward_hook(
        lambda m, a, out: (out[0].detach(),) + tuple(out[1:]) if isinstance(out, tuple) else out.detach())


@pytest.mark.slow
def test_missing_gradients_stop_the_run_and_the_probe_names_the_cause(tmp_path):
    model = _lora()
    _detach_layer_1(model)
    cb = GradFlowCallback(check_every=5, moved_at_step=None, preflight=False)
    trainer = _run(tmp_path, model, cb, steps=20)
    slugs = [f.slug for f in cb.findings]
    assert slugs[0] == "grad-missing-in-training"
    assert "layers.0" in cb.findings[0].location or "layers.1" in cb.findings[0].location
    assert "graph-break" in slugs  # the probe on the last batch diagnoses why
    assert trainer.state.global_step == 1


def _subset_optimizer_trainer(tmp_path, model, cb):
    # the user's optimizer holds only the first layer's adapters: the rest get gradients but never move
    first = [p for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n]
    targs = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=10,
                              learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                              disable_tqdm=True)
    return Trainer(model=model, args=targs, train_dataset=_Rows(), callbacks=[cb],
                   optimizers=(torch.optim.AdamW(first, lr=1e-3), None))


@pytest.mark.slow
def test_weights_that_never_move_are_a_finding(tmp_path):
    cb = GradFlowCallback(check_every=10, moved_at_step=3, preflight=False)
    trainer = _subset_optimizer_trainer(tmp_path, _lora(), cb)
    trainer.train()
    assert [f.slug for f in cb.findings] == ["adapter-not-updated"]
    assert ".layers.0." not in cb.findings[0].params[0]
    assert trainer.state.global_step == 3


@pytest.mark.slow
def test_raise_on_error_raises_for_weights_that_never_move(tmp_path):
    model = _lora()
    cb = GradFlowCallback(check_every=10, moved_at_step=3, preflight=False, raise_on_error=True)
    trainer = _subset_optimizer_trainer(tmp_path, model, cb)
    with pytest.raises(GradflowError) as err:
        trainer.train()
    assert [f.slug for f in err.value.findings] == ["adapter-not-updated"]
    assert "GF402 adapter-not-updated at " in str(err.value) and "fix: " in str(err.value)
    assert trainer.state.global_step == 3
    assert cb._hook is None  # on_train_end never runs after a raise: the batch hook is removed anyway


@pytest.mark.slow
def test_raise_on_error_raises_for_missing_gradients_with_their_cause(tmp_path):
    model = _lora()
    _detach_layer_1(model)
    cb = GradFlowCallback(check_every=5, moved_at_step=None, preflight=False, raise_on_error=True)
    trainer = Trainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True), train_dataset=_Rows(), callbacks=[cb])
    with pytest.raises(GradflowError) as err:
        trainer.train()
    slugs = [f.slug for f in err.value.findings]
    assert slugs[0] == "grad-missing-in-training" and "graph-break" in slugs  # the diagnosis travels with it
    assert "at step 1" in str(err.value)
    assert trainer.state.global_step == 0  # raised in on_pre_optimizer_step: the first update never happened


@pytest.mark.slow
def test_batch_without_supervised_tokens_is_a_finding(tmp_path):
    cb = GradFlowCallback(check_every=2, moved_at_step=None, preflight=False)
    _run(tmp_path, _lora(), cb, steps=4, dataset=_Rows(mask_all=True))
    assert "no-supervised-tokens" in [f.slug for f in cb.findings]
    assert cb.stopped_at is not None


@pytest.mark.slow
def test_a_batch_without_supervised_tokens_is_said_once_with_the_preflight(tmp_path, capfd):
    cb = GradFlowCallback(check_every=1, moved_at_step=None)  # the pre-flight probes the same first batch
    _run(tmp_path, _lora(), cb, steps=4, dataset=_Rows(mask_all=True))
    assert [f.slug for f in cb.findings] == ["no-supervised-tokens"]
    assert capfd.readouterr().err.count("no-supervised-tokens") == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_check_every_must_be_positive(bad):
    with pytest.raises(ValueError):
        GradFlowCallback(check_every=bad)


def test_every_argument_is_documented_and_no_doc_says_moved_at():
    root = pathlib.Path(__file__).resolve().parents[2]
    params = [p for p in inspect.signature(GradFlowCallback.__init__).parameters if p != "self"]
    doc = inspect.getdoc(GradFlowCallback)
    args_section = doc.split("Args:", 1)[1].split("Attributes:", 1)[0]
    documented = set(re.findall(r"^    (\w+):", args_section, re.M))  # getdoc dedents: Args entries sit at 4
    train_md = (root / "docs" / "train.md").read_text()
    for name in params:
        assert name in documented, f"{name} is missing from GradFlowCallback's Args"
        assert f"`{name}`" in train_md, f"{name} is missing from docs/train.md"
    texts = {str(p.relative_to(root)): p.read_text() for p in [*(root / "docs").glob("*.md"), root / "README.md",
                                                               *(root / "gradflow").rglob("*.py")]}
    assert not [name for name, text in texts.items() if re.search(r"\bmoved_at=", text)]
