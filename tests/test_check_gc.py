"""--check-gc end to end: the model's checkpointing state is put back exactly, and the CLI reports the comparison."""

from __future__ import annotations

import torch
import torch.utils.checkpoint as tuc

import gradflow
from tests.helpers.builders import base, batch, enable_gc, lora, lora_config, tiny_batch, tiny_lm
from tests.helpers.cli import invoke

_GC_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hook", "_require_grads_hooks")


def _state(model):
    """Everything --check-gc may touch, as comparable values."""
    return {
        "attrs": [(n, {a: m.__dict__.get(a, "missing") for a in _GC_ATTRS}) for n, m in model.named_modules()],
        "hooks": [(n, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                  for n, m in model.named_modules()],
        "flags": [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "modes": [m.training for m in model.modules()],
        "dropout": [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)],
        "checkpoint": (tuc.CheckpointFunction, tuc._checkpoint_without_reentrant_generator),
    }


def _assert_restored(model, data, check):
    model.eval()  # found in eval mode: it must come back in eval mode
    before = _state(model)
    rng = torch.get_rng_state()
    with torch.no_grad():
        logits = model(**data).logits
    report = check()
    assert _state(model) == before
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, logits, rtol=0, atol=0)
    return report


def test_gc_off_model_comes_back_off():
    """transformers' checkpointing is turned on for the check (and its input-grad hook on 5.x), then undone."""
    model = lora("tiny-phi3", lora_dropout=0.1)
    data = batch(model)
    report = _assert_restored(model, data, lambda: gradflow.probe(model, data, check_gc=True))
    assert report.snapshot.gc_equivalence.enabled_for_check
    assert report.extra["gc_check"]["mode"] == "non-reentrant"


def test_reentrant_model_keeps_its_mode_and_function():
    model = enable_gc(base("tiny-phi3"), reentrant=True)
    from peft import get_peft_model

    model = get_peft_model(model, lora_config())
    model.enable_input_require_grads()
    data = batch(model)
    report = _assert_restored(model, data, lambda: gradflow.probe(model, data, check_gc=True))
    assert report.extra["gc_check"]["mode"] == "reentrant" and not report.extra["gc_check"]["diffs"]


def test_a_model_that_cannot_checkpoint_is_reported_not_raised():
    model = tiny_lm(freeze=False)
    report = gradflow.probe(model, tiny_batch(), check_gc=True)
    gc = report.to_dict()["gc_check"]
    assert gc["compared"] is False and "TinyLM" in gc["reason"]
    assert "check-gc: not compared" in report.render(color=False, width=200)


FACTORY = '''
import torch
from peft import LoraConfig, get_peft_model
from gradflow.setup.presets import build_preset


class Counter(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * (1 + 0.1 * self.calls)


def counted():
    model = build_preset("tiny-llama", seed=0)
    for layer in model.model.layers:
        layer.mlp = Counter(layer.mlp)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
'''


def test_cli_check_gc(tmp_path):
    healthy = invoke("probe-backward", "tiny-phi3", "--gc", "non-reentrant", "--check-gc", "--seq-len", "16",
                     "--format", "json")
    assert healthy.code == 0, healthy.stderr
    gc = healthy.json()["gc_check"]
    assert gc["compared"] and gc["mode"] == "non-reentrant" and gc["diffs_count"] == 0

    (tmp_path / "counted.py").write_text(FACTORY)
    broken = invoke("probe-backward", f"{tmp_path / 'counted.py'}:counted", "--gc", "non-reentrant", "--check-gc",
                    "--seq-len", "16")
    assert broken.code == 1, broken.stderr
    assert "GF104 checkpoint-changes-gradients" in broken.stdout
    assert "check-gc: non-reentrant vs off:" in broken.stdout

    silent = invoke("probe-backward", "tiny-phi3", "--seq-len", "16", "--format", "json")
    assert silent.code == 0 and "gc_check" not in silent.json()


def test_qlora_gradients_are_compared_at_the_compute_dtype():
    """prepare_model_for_kbit_training upcasts every float parameter to fp32, but the 4-bit layers compute in bf16:
    the bf16 tolerance must apply (on an H200 the fp32 tolerance flagged 106 of 256 healthy LoRA gradients)."""
    from gradflow.probing.gc_check import compute_dtype
    from gradflow.setup.build import SetupOptions
    from gradflow.setup.load import load_setup

    setup = load_setup("tiny-llama", SetupOptions(quant="4bit", dtype="bfloat16", lora_r=4, gc="non-reentrant"))
    assert compute_dtype(setup.model) == "bfloat16"
    plain = load_setup("tiny-llama", SetupOptions(lora_r=4))
    assert compute_dtype(plain.model) == "float32"
