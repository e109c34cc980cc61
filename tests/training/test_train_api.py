"""gradflow.train end to end on tiny presets: the demo, SO(8), seed_bug through the pre-flight, QLoRA."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.testing import assert_close

import gradflow
from gradflow.setup.presets import build_preset
from gradflow.setup.build import SetupOptions
from tests.helpers.train import DEMO

pytestmark = pytest.mark.slow  # every test is a gradflow.train run (a real Trainer)


def _ids():
    return torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def test_demo_trains_loss_falls_and_adapter_reloads_with_same_logits(tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    report = gradflow.train("tiny-phi3", DEMO, str(out), setup_options=SetupOptions(gc="off"), max_steps=30,
                            learning_rate=5e-3, seq_len=96, logging_steps=5, progress=False)
    state = report.extra["train"]
    assert state["status"] == "completed" and state["steps"] == 30
    losses = [x["loss"] for x in state["losses"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert state["gradients"]["missing"] == 0 and state["gradients"]["params_moved"] == 32
    reloaded = PeftModel.from_pretrained(build_preset("tiny-phi3", seed=0), str(out / "adapter"))
    assert_close(_logits(reloaded), _logits(report.trained_model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(build_preset("tiny-phi3", seed=0)), _logits(reloaded), atol=1e-3)
    saved = json.loads((out / "report.json").read_text())
    assert saved["command"] == "train" and saved["train"]["status"] == "completed"
    assert saved["data"]["think_samples"] == 24 and saved["train"]["gradients"]["per_layer"]
    assert (out / "grad_norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 24 and audit[0]["id"] == "demo-00" and len(audit[0]["think_sha256"]) == 1 \
        and len(audit[0]["think_sha256"][0]) == 64  # one hash per assistant turn
    assert audit[0]["supervised_tokens"] < audit[0]["tokens"]


def test_so8_layers_train_save_reload_and_merge(tmp_path):
    from gradflow.setup import so8
    from gradflow.training import load_adapter

    out = tmp_path / "run"
    report = gradflow.train("tiny-llama", DEMO, str(out), setup_options=SetupOptions(gc="non-reentrant"),
                            max_steps=6, learning_rate=1e-2, seq_len=64, so8_layers=[1, 3], moved_at_step=3,
                            merge=True, progress=False)
    assert report.extra["train"]["status"] == "completed", report.extra["train"]
    rot = so8.rotations(report.trained_model)
    assert len(rot) == 2 and not torch.allclose(next(iter(rot.values())), torch.eye(8).expand(8, 8, 8))
    reloaded = load_adapter(build_preset("tiny-llama", seed=0), str(out / "adapter"))
    assert_close(_logits(reloaded), _logits(report.trained_model), atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert_close(_logits(merged), _logits(report.trained_model), atol=1e-4, rtol=1e-4)


def test_seed_bug_trains_only_through_the_preflight_fix(tmp_path):
    out = tmp_path / "run"
    report = gradflow.train("gradflow.demos:seed_bug", DEMO, str(out), max_steps=6, learning_rate=5e-3,
                            seq_len=64, moved_at_step=3, progress=False)
    saved = json.loads((out / "report.json").read_text())
    assert any("reentrant-checkpoint-no-input-grad" in line for line in saved["preflight"]["errors_before"])
    assert saved["before"]["loss"]["grad_fn"] is None
    assert saved["train"]["status"] == "completed"
    assert saved["preflight"]["errors_after"] == [] and saved["fixes_applied"]
    assert saved["after"]["loss"]["grad_fn"] is not None
    grads = saved["train"]["gradients"]
    assert grads["params_moved"] == grads["params_trainable"] > 0
    assert report.extra["train"]["status"] == "completed"


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_qlora_runs_on_cpu(tmp_path, quant):
    from peft import PeftModel

    out = tmp_path / quant
    report = gradflow.train("tiny-llama", DEMO, str(out), setup_options=SetupOptions(quant=quant, gc="off"),
                            max_steps=4, learning_rate=5e-3, seq_len=48, moved_at_step=2, check_every=2,
                            progress=False)
    state = report.extra["train"]
    assert state["status"] == "completed", state
    assert report.to_dict()["model"]["quantized"] == quant
    assert state["gradients"]["missing"] == 0 and state["gradients"]["params_moved"] > 0
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    PeftModel.from_pretrained(build_preset("tiny-llama", seed=0), str(out / "adapter"))


_LATE_NAN = '''
import torch

from gradflow.setup.build import apply_lora
from gradflow.setup.presets import build_preset, build_tokenizer


def build():
    model = apply_lora(build_preset("tiny-llama", seed=0, training=True), 4, 8, "all-linear")
    mlp = model.get_base_model().model.layers[2].mlp
    lora_b = mlp.down_proj.lora_B["default"].weight  # zero until the first optimizer step

    def inf_once_trained(module, args, out):  # the pre-flight's probes see a finite model
        return out * float("inf") if bool(lora_b.detach().abs().sum() > 0) else out

    mlp.register_forward_hook(inf_once_trained)
    return {"model": model, "tokenizer": build_tokenizer()}
'''


def test_a_nan_loss_is_logged_as_nan_not_as_a_perfect_zero(tmp_path):
    """The Trainer's logging_nan_inf_filter logs the running mean for a non-finite step, which reads 0.0 when every
    step since the last log was NaN: gradflow logs the loss as it is."""
    factory = tmp_path / "late_nan.py"
    factory.write_text(_LATE_NAN)
    report = gradflow.train(f"{factory}:build", DEMO, str(tmp_path / "run"), max_steps=4, seq_len=64,
                            logging_steps=1, check_every=10, progress=False)
    losses = [x["loss"] for x in report.extra["train"]["losses"]]
    assert losses[0] == losses[0] and losses[-1] != losses[-1], losses  # finite first, NaN at the end
    assert 0.0 not in losses


_EMBEDDINGS_BY_HAND = '''
from gradflow.setup.build import apply_lora
from gradflow.setup.presets import build_preset, build_tokenizer


def build():
    model = apply_lora(build_preset("tiny-llama", seed=0, training=True), 4, 8, "all-linear")
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)  # unfrozen by hand: not in the adapter
    return {"model": model, "tokenizer": build_tokenizer()}
'''


def test_trainable_tensors_save_pretrained_drops_are_kept_beside_the_adapter(tmp_path):
    """An embedding unfrozen by hand trains, but save_pretrained leaves it out (trainable-param-not-saved, which
    train warns of): the run keeps it in adapter/trainable_state.pt, and load_adapter gives back the trained model."""
    from peft import PeftModel

    from gradflow.training import load_adapter

    factory, out = tmp_path / "by_hand.py", tmp_path / "run"
    factory.write_text(_EMBEDDINGS_BY_HAND)
    report = gradflow.train(f"{factory}:build", DEMO, str(out), max_steps=3, seq_len=64, learning_rate=1e-2,
                            progress=False)
    state = report.extra["train"]
    assert state["adapter_outside"] == {"file": "trainable_state.pt",
                                        "tensors": ["base_model.model.model.embed_tokens.weight"]}
    assert "trainable-param-not-saved" in report.slugs()
    trained = _logits(report.trained_model)
    restored = load_adapter(build_preset("tiny-llama", seed=0), str(out / "adapter"))
    assert_close(_logits(restored), trained, atol=1e-5, rtol=1e-5)
    # what plain PEFT loads misses the trained embedding
    plain = PeftModel.from_pretrained(build_preset("tiny-llama", seed=0), str(out / "adapter"))
    assert not torch.allclose(_logits(plain), trained, atol=1e-3)
