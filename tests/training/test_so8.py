"""SO(8) rotation adapters: exactly orthogonal, identity at init, trained, saved, reloaded and merged."""

from __future__ import annotations

import json

import torch
from torch.testing import assert_close

from gradflow.setup.presets import build_preset
from gradflow.setup.build import apply_lora
from gradflow.setup import so8
from gradflow.setup.so8 import load_adapter

LAYERS = [1, 2]


def _ids(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (2, 24), generator=gen)


def _so8_lora_model(seed=0):
    model = build_preset("tiny-phi3", seed=seed)
    so8.install(model, LAYERS)
    model = apply_lora(model, 4, 8, "all-linear", modules_to_save=[so8.MODULE_NAME])
    so8.attach_hooks(model)
    return model


def _perturb(model, scale=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA A/B and the trained SO(8) copies
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_rotation_is_in_so8_in_fp32():
    rot = so8.SO8Rotation(64)
    with torch.no_grad():
        rot.theta.normal_(0, 1.0)
    r = rot.rotation()
    assert r.shape == (8, 8, 8) and r.dtype == torch.float32
    eye = torch.eye(8).expand(8, 8, 8)
    assert (r.transpose(-1, -2) @ r - eye).abs().amax() <= 1e-5
    assert_close(torch.linalg.det(r.double()), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_identity_at_init_gives_the_base_model_outputs():
    base = build_preset("tiny-phi3", seed=0).eval()
    model = _so8_lora_model().eval()
    assert torch.equal(so8.rotations(model)["base_model.model.model.layers.1.self_attn"], torch.eye(8).expand(8, 8, 8))
    with torch.no_grad():
        assert_close(model(input_ids=_ids()).logits, base(input_ids=_ids()).logits, atol=1e-6, rtol=0)


def test_rotation_changes_outputs_and_gradients_reach_theta():
    model = _so8_lora_model()
    thetas = {n: p for n, p in model.named_parameters() if n.endswith("theta") and p.requires_grad}
    assert len(thetas) == len(LAYERS) and all("modules_to_save" in n for n in thetas)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in thetas.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = model(input_ids=ids).logits.detach()
    _perturb(model)
    assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-3)


def test_save_reload_round_trip(tmp_path):
    model = _so8_lora_model()
    _perturb(model)
    model.eval()
    model.save_pretrained(tmp_path)
    so8.write_meta(str(tmp_path), LAYERS)
    reloaded = load_adapter(build_preset("tiny-phi3", seed=0), str(tmp_path)).eval()
    for name, r in so8.rotations(model).items():
        assert_close(so8.rotations(reloaded)[name], r)
    with torch.no_grad():
        assert_close(reloaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits, atol=1e-6, rtol=0)


def test_merged_and_unmerged_outputs_match():
    model = _so8_lora_model()
    _perturb(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=_ids()).logits
    merged = model.merge_and_unload()
    assert so8.fold_into_o_proj(merged) == len(LAYERS)
    assert not any(isinstance(m, so8.SO8Rotation) for m in merged.modules())
    assert all(not hasattr(m, "_gradflow_so8_hook") or m._gradflow_so8_hook is None for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(input_ids=_ids()).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_bad_layer_spec_and_layer_out_of_range():
    import pytest

    from gradflow.errors import GradflowError

    with pytest.raises(GradflowError, match="comma-separated"):
        so8.parse_layers("1,x")
    assert so8.parse_layers("3, 1,3") == [1, 3]
    with pytest.raises(GradflowError, match="no such layer"):
        so8.install(build_preset("tiny-phi3"), [9])
    with pytest.raises(GradflowError, match="no attention module with an o_proj"):
        so8.install(build_preset("tiny-gpt2"), [0])


def test_a_build_option_of_every_command_and_restored_with_the_adapter(tmp_path):
    """SetupOptions(so8_layers=…) builds the rotations for probe and patch as for train; an adapter directory
    that holds them is probed with them (and the hooks that apply them)."""
    import gradflow
    from gradflow.setup.build import SetupOptions
    from gradflow.setup.load import load_setup

    opts = SetupOptions(so8_layers=[2, 1, 2], lora_r=4)
    assert opts.so8_layers == [1, 2]
    with_so8, lora_only = (gradflow.probe("tiny-phi3", setup=o).to_dict()["params"]
                           for o in (opts, SetupOptions(lora_r=4)))
    assert (with_so8["trainable"], with_so8["with_grad"]) == (lora_only["trainable"] + 2, lora_only["with_grad"] + 2)
    ok = {row["layer"]: row["grads"]["ok"] - base["grads"]["ok"]
          for row, base in zip(with_so8["per_layer"], lora_only["per_layer"])}
    assert ok == {"layers.0": 0, "layers.1": 1, "layers.2": 1, "layers.3": 0}  # each rotation's theta gets a gradient

    model = load_setup("tiny-phi3", opts).model
    _perturb(model)
    model.save_pretrained(tmp_path)
    so8.write_meta(str(tmp_path), LAYERS)
    config = tmp_path / "adapter_config.json"  # a preset's adapter names no base: say which (as train does)
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "tiny-phi3"}))
    reloaded = load_setup(str(tmp_path), SetupOptions()).model
    for name, r in so8.rotations(model).items():
        assert_close(so8.rotations(reloaded)[name], r)
    with torch.no_grad():
        assert_close(reloaded.eval()(input_ids=_ids()).logits, model.eval()(input_ids=_ids()).logits,
                     atol=1e-6, rtol=0)


def test_refused_where_there_is_no_new_lora_adapter_to_ride_on():
    import pytest

    from gradflow.errors import GradflowError
    from gradflow.setup.build import SetupOptions
    from gradflow.setup.load import load_setup

    with pytest.raises(GradflowError, match="--lora-r is 0"):
        SetupOptions(so8_layers=[1], lora_r=0)
    with pytest.raises(GradflowError, match="indices from 0"):
        SetupOptions(so8_layers=[-1])
    with pytest.raises(GradflowError, match="a base model that gradflow adds LoRA to"):
        load_setup("gradflow.demos:seed_bug", SetupOptions(so8_layers=[0]))
