"""The probe leaves the model as it found it: flags, hooks, gradients, modes, RNG and torch's checkpoint functions."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as tuc
from torch.nn.modules import module as torch_module

import gradflow
from tests.helpers.builders import (KeywordCheckpointed, SqrtGatedBlock, base, batch, disable_input_grad_hook,
                                    enable_gc, lora, lora_config, tiny_batch, tiny_lm, wrap_layers)

TORCH_CHECKPOINT = (tuc.CheckpointFunction, tuc._checkpoint_without_reentrant_generator, tuc.checkpoint)


def _state(model):
    """Everything a probe must not change, captured by identity where identity matters."""
    return {
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad) for n, p in model.named_parameters()],
        "grad_values": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "values": [(n, p.detach().clone()) for n, p in model.named_parameters()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()],
        "global_hooks": (dict(torch_module._global_forward_hooks), dict(torch_module._global_forward_pre_hooks),
                         dict(torch_module._global_backward_hooks)),
        "checkpoint": (tuc.CheckpointFunction, tuc._checkpoint_without_reentrant_generator, tuc.checkpoint),
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_same(before, after):
    assert after["flags"] == before["flags"]
    for (name, g0), (_, g1) in zip(before["grads"], after["grads"]):
        assert g1 is g0, f"{name}: .grad replaced"
    for (name, v0), (_, v1) in zip(before["grad_values"], after["grad_values"]):
        if v0 is not None:
            torch.testing.assert_close(v1, v0, rtol=0, atol=0, msg=f"{name}: .grad changed")
    for (name, v0), (_, v1) in zip(before["values"], after["values"]):
        torch.testing.assert_close(v1, v0, rtol=0, atol=0, equal_nan=True, msg=f"{name}: value changed")
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert after["global_hooks"] == before["global_hooks"]
    assert after["checkpoint"] == before["checkpoint"] == TORCH_CHECKPOINT  # torch's own functions again
    assert torch.equal(after["rng"], before["rng"])
    assert after["grad_mode"] == before["grad_mode"]


def _prepopulate(model):
    """Some stale gradients (a half-finished accumulation step), on trainable and frozen params alike."""
    params = list(model.parameters())
    for p in params[::3]:
        p.grad = torch.full_like(p, 0.5)


def _mixed_modes(model):
    model.eval()
    for i, m in enumerate(model.modules()):
        if i % 4 == 0:
            m.train()


def _fresh_lora():
    model = lora()
    return model, batch(model), {}


def _seed_bug():
    from gradflow.demos import seed_bug

    setup = seed_bug()
    return setup["model"], setup["batch"], {}


def _nested():
    from peft import get_peft_model

    model = wrap_layers(get_peft_model(enable_gc(base(), reentrant=True), lora_config()), KeywordCheckpointed)
    return model, batch(model), {}


def _non_reentrant():
    model = disable_input_grad_hook(enable_gc(lora(), reentrant=False))
    return model, batch(model), {}


def _nonfinite():
    model = tiny_lm(freeze=False)
    model.blocks[1] = SqrtGatedBlock(16)
    return model, tiny_batch(), {"trainable": r"gate"}


def _forward_error():
    model = lora()

    def loss_fn(m, data):
        m(**data)
        raise RuntimeError("the user's loss failed")

    return model, batch(model), {"loss_fn": loss_fn, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


@pytest.mark.parametrize("build", [_fresh_lora, _seed_bug, _nested, _non_reentrant, _nonfinite, _forward_error],
                         ids=lambda f: f.__name__.strip("_"))
def test_probe_leaves_the_model_as_found(build):
    model, data, kwargs = build()
    _prepopulate(model)
    _mixed_modes(model)
    model.get_submodule("").register_forward_hook(lambda m, a, o: None)  # a user's hook stays, ours go
    before = _state(model)
    report = gradflow.probe(model, data, **kwargs)
    _assert_same(before, _state(model))
    assert report.snapshot.probed


def test_inspect_leaves_the_model_as_found():
    model, data, _ = _seed_bug()
    _prepopulate(model)
    before = _state(model)
    gradflow.inspect(model, data)
    _assert_same(before, _state(model))


def test_probe_restores_after_an_exception_in_the_probe_itself():
    """A batch the model cannot take (wrong type) fails inside the forward: still restored."""
    model = lora()
    _prepopulate(model)
    before = _state(model)
    gradflow.probe(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": "oops"})
    _assert_same(before, _state(model))


def test_probe_gradients_are_the_models_own():
    """The probe's grads match a plain forward+backward of the same batch (so it measured the real thing)."""
    model = tiny_lm(freeze=False)
    data = tiny_batch()
    report = gradflow.probe(model, data)
    model.train()
    model(**data)["loss"].backward()
    for state in report.snapshot.params:
        p = model.get_parameter(state.name)
        expected = torch.linalg.vector_norm(p.grad).item()
        assert state.grad_norm == pytest.approx(expected, rel=1e-5)
