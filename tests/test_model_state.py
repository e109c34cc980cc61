"""The shared model facts: ModelState puts back all it captured (and, with `since`, only what changed before it),
the atomic writer, unwrap and decoder_layers. Tiny real models, no mocks."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from gradflow.files import write_json, write_jsonl
from gradflow.model_state import ModelState, kept
from gradflow.models import decoder_layers, unwrap
from gradflow.setup.presets import build_preset


def _lora():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _facts(model):
    """What ModelState covers, as comparable values (identity where identity matters)."""
    return {
        "hooks": [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for n, m in model.named_modules()],
        "children": [(n, dict(m._modules)) for n, m in model.named_modules()],
        "attrs": [(n, m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_gradient_checkpointing_func"),
                   m.__dict__.get("_require_grads_hook")) for n, m in model.named_modules()],
        "modes": [m.training for m in model.modules()],
        "params": [(n, p.dtype, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "use_cache": model.config.use_cache,
        "r": model.peft_config["default"].r,
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _same(a, b):
    for key in a:
        if key == "rng":
            assert torch.equal(a[key][0], b[key][0]) and a[key][1] == b[key][1] and (a[key][2] == b[key][2]).all()
        else:
            assert a[key] == b[key], key


def _change(model):
    """What patches, probes and a Trainer's preparation change."""
    layer = model.base_model.model.model.layers[0]
    layer.mlp.register_forward_hook(lambda m, a, o: None)
    layer.mlp.act_fn = torch.nn.Identity()  # a child replaced
    layer.gradient_checkpointing = True
    q = layer.self_attn.q_proj.lora_A["default"].weight
    q.data = q.data.double()  # a dtype cast swaps .data
    q.requires_grad_(False)
    layer.self_attn.v_proj.base_layer.weight.grad = torch.ones_like(layer.self_attn.v_proj.base_layer.weight)
    model.eval()
    model.config.use_cache = not model.config.use_cache
    model.peft_config["default"].r = 99
    torch.rand(3), random.random(), np.random.rand()


def test_restore_puts_back_everything_captured():
    model = _lora()
    model.train()
    data = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "past_key_values": ((1,),)}
    before = _facts(model)
    with kept(model, batch=data):
        _change(model)
        data.pop("past_key_values")
    _same(before, _facts(model))
    assert "past_key_values" in data
    q = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert q.dtype == torch.float32


def test_restore_since_keeps_later_changes():
    """The Trainer source: undo what happened up to `since` (the trainer's preparation), keep what came after."""
    model = _lora()
    before = _facts(model)
    state = ModelState(model)
    embed = model.get_input_embeddings()
    prep_hook = embed.register_forward_hook(lambda m, a, o: None)
    model.base_model.model.model.layers[1].gradient_checkpointing = True
    model.train()
    prepared = ModelState(model)
    patch_hook = embed.register_forward_hook(lambda m, a, o: None)  # a patch inside the block
    flag = model.base_model.model.model.layers[2].self_attn.q_proj.lora_A["default"].weight
    flag.requires_grad_(False)
    state.restore(since=prepared)
    assert prep_hook.id not in embed._forward_hooks and patch_hook.id in embed._forward_hooks
    assert model.base_model.model.model.layers[1].gradient_checkpointing is False
    assert flag.requires_grad is False
    patch_hook.remove()
    flag.requires_grad_(True)
    _same(before, _facts(model))


def test_values_and_buffers_are_copies():
    model = build_preset("tiny-llama", seed=0)
    weight = model.lm_head.weight
    original = weight.detach().clone()
    with kept(model, values=[weight], buffers=True) as state:
        with torch.no_grad():
            weight.add_(1.0)
        assert torch.equal(state.value(weight), original)
    assert torch.equal(weight, original)


def test_decoder_layers():
    model = build_preset("tiny-llama", seed=0)
    layers = list(model.model.layers)
    assert decoder_layers(model) == layers == decoder_layers(model, checkpointable=True)
    assert decoder_layers(_lora(), checkpointable=True) and len(decoder_layers(_lora())) == len(layers)

    class Blocks(torch.nn.Module):  # one's own model: a ModuleList of blocks, an inner list not counted twice
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4)] * 2))
                for _ in range(3))
            self.norms = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])  # no parameters

    own = Blocks()
    assert decoder_layers(own) == list(own.blocks) and decoder_layers(own, checkpointable=True) == []


def test_unwrap():
    model = build_preset("tiny-llama", seed=0)
    assert unwrap(model) is model
    assert unwrap(torch.nn.DataParallel(torch.nn.DataParallel(model))) is model
    assert unwrap(torch.compile(torch.nn.DataParallel(model))) is model

    class Head(torch.nn.Module):  # a model whose child is called `module`, with weights of its own: no wrapper
        def __init__(self, inner):
            super().__init__()
            self.module, self.head = inner, torch.nn.Linear(2, 2)

    head = Head(model)
    assert unwrap(head) is head


def test_atomic_writes(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_json(str(path), {"v": 1, "when": object()}, default=lambda o: "obj")
    assert json.loads(path.read_text()) == {"v": 1, "when": "obj"} and path.read_text().endswith("}\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    write_jsonl(str(tmp_path / "a.jsonl"), [{"t": "é"}, {"t": 2}])
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_json(str(path), {"v": 2})
    assert json.loads(path.read_text())["v"] == 1 and sorted(os.listdir(tmp_path)) == ["a.json", "a.jsonl"]
