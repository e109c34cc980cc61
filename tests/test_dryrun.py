"""A dry run (toy-width twin, no weights) finds what a real probe of the same setup finds.

The "real" side is a small-width Llama saved with weights (4 layers, hidden 128, 8 query / 2 key-value heads), loaded
and probed the ordinary way; the dry run reads only its config.json. Findings must agree in code, slug, severity,
location, message and the parameters they name, and the parameter counts must be the real model's.
"""

from __future__ import annotations

import pytest

from gradflow.dryrun import UNSEEN, dry_run
from gradflow.setup.twin import shrink_config
from gradflow.setup.build import SetupOptions

SETUPS = {
    # healthy on both stacks: LoRA on every linear layer, non-reentrant checkpointing
    "healthy": dict(lora_r=8, lora_targets="all-linear", gc="non-reentrant"),
    # the 70B benchmark's setup, at small width
    "reentrant-all-linear": dict(lora_r=8, lora_targets="all-linear", gc="reentrant"),
    # broken: the user means to train the embeddings too, but LoRA froze them
    "intended-frozen": dict(lora_r=4, lora_targets="q_proj,v_proj", gc="reentrant", trainable=r"lora_|embed_tokens"),
    # a warning: a full fine-tune (no LoRA) of bf16 weights trains half-precision parameters
    "full-bf16": dict(lora_r=0, gc="non-reentrant", dtype="bfloat16"),
    # QLoRA through the real bitsandbytes load path, without checkpointing
    "qlora-4bit": dict(lora_r=8, lora_targets="all-linear", quant="4bit"),
}


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A small-width Llama with its weights (the real thing at small width), as save_pretrained writes it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("small-llama")
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _real(folder, opts):
    import gradflow
    from gradflow.setup.load import load_setup, make_batch

    setup = load_setup(str(folder), opts)
    batch = make_batch(setup, data=None, batch_size=2, seq_len=16, seed=0)
    return gradflow.probe(setup.model, batch, trainable=setup.trainable)


def _key(report):
    return [(f.code, f.slug, f.severity, f.location, f.message, tuple(f.params)) for f in report.findings
            if f.slug not in UNSEEN]


def _grads(report):
    return {row["name"]: row["grad"] for row in report.params["per_param"]}


@pytest.mark.parametrize("name", list(SETUPS))
def test_dry_run_finds_what_a_real_probe_finds(small_llama, name):
    real = _real(small_llama, SetupOptions(device="cpu", **SETUPS[name]))
    dry = dry_run(str(small_llama / "config.json"), SetupOptions(device="cpu", **SETUPS[name]), seq_len=16)

    assert _key(dry) == _key(real)
    assert _grads(dry) == _grads(real)  # every trainable parameter: the same name and the same ok/none/zero class
    for key in ("params_total", "params_trainable", "class", "quantized", "gradient_checkpointing",
                "input_grad_hook"):
        assert dry.model[key] == real.model[key], key
    assert dry.params["none_grad"] == real.params["none_grad"]
    # the per-module roll-ups carry the real counts too
    real_rows = {m["name"]: (m["trainable"], m["frozen"], m["quantized"]) for m in real.modules}
    assert {m["name"]: (m["trainable"], m["frozen"], m["quantized"]) for m in dry.modules} == real_rows
    info = dry.extra["dry_run"]
    assert info["weights_loaded"] is False and info["unmapped_count"] == 0
    assert set(info["not_seen"]) == {"nonfinite-grad", "no-supervised-tokens", "param-not-in-optimizer"}
    assert dry.loss["value"] is None and dry.loss["grad_fn"] == real.loss["grad_fn"]


def test_the_comparison_is_not_vacuous(small_llama):
    """The broken setups do fire errors and warnings; the healthy one fires none."""
    slugs = {name: {f.slug for f in _real(small_llama, SetupOptions(device="cpu", **SETUPS[name])).findings
                    if f.severity != "info"} for name in ("healthy", "intended-frozen", "full-bf16")}
    assert slugs["healthy"] == set()
    assert "intended-param-frozen" in slugs["intended-frozen"]
    assert "half-precision-trainable-params" in slugs["full-bf16"]


def test_twin_keeps_grouping_layers_and_names():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, bos_token_id=128000, eos_token_id=[128001, 128009])
    twin = shrink_config(cfg, min_hidden=8)
    assert twin.num_hidden_layers == 80
    assert twin.num_attention_heads // twin.num_key_value_heads == 8  # the same GQA grouping
    assert twin.hidden_size == twin.num_attention_heads * twin.head_dim <= 128
    assert twin.vocab_size == 256 and twin.bos_token_id < 256 and all(i < 256 for i in twin.eos_token_id)
    assert cfg.hidden_size == 8192  # the real config is left as it was
    # a LoRA rank wider than the toy width widens the twin, so the rank check and LoRA shapes stay meaningful
    assert shrink_config(cfg, min_hidden=512).hidden_size >= 512


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-mixtral"])  # Conv1D projections; LoRA on fused MoE experts
def test_preset_dry_run_equals_real_probe(preset):
    import gradflow
    from gradflow.setup.load import load_setup, make_batch

    opts = dict(device="cpu", lora_r=8, lora_targets="all-linear", gc="reentrant")
    setup = load_setup(preset, SetupOptions(**opts))
    real = gradflow.probe(setup.model, make_batch(setup, data=None, batch_size=2, seq_len=16, seed=0))
    dry = dry_run(preset, SetupOptions(**opts), seq_len=16)
    assert _key(dry) == _key(real) and _key(real)  # lora-zero-init and use-cache-in-training at least
    assert _grads(dry) == _grads(real)
    assert (dry.model["params_total"], dry.model["params_trainable"]) == (real.model["params_total"],
                                                                          real.model["params_trainable"])


def test_inspect_dry_run_shows_the_real_tree(small_llama):
    import gradflow
    from gradflow.setup.load import load_setup

    opts = dict(device="cpu", lora_r=8, gc="reentrant")
    setup = load_setup(str(small_llama), SetupOptions(**opts))
    real = gradflow.inspect(setup.model, static=True)
    dry = dry_run(str(small_llama), SetupOptions(**opts), command="inspect", static=True)
    assert dry.command == "inspect" and dry.params["with_grad"] is None  # no backward was run
    assert [(m["name"], m["class"], m["trainable"], m["frozen"], m["checkpointing"]) for m in dry.modules] == \
        [(m["name"], m["class"], m["trainable"], m["frozen"], m["checkpointing"]) for m in real.modules]
    assert _key(dry) == _key(real)


def test_phi35_longrope_config_twin(tmp_path):
    """Phi-3.5-mini's longrope factors have one entry per rotary pair: the twin cuts them to its own head size."""
    from transformers import Phi3Config

    Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
               original_max_position_embeddings=4096, pad_token_id=32000, eos_token_id=32000,
               rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48},
               tie_word_embeddings=False).save_pretrained(tmp_path)
    report = dry_run(str(tmp_path), SetupOptions(device="cpu", lora_r=16, gc="non-reentrant"), seq_len=16)
    assert report.params["none_grad"] == 0 and report.params["trainable"] == 2 * 2 * 4  # 4 linears per layer
    # the real Phi-3.5 layer: qkv 3072x9216, o 3072x3072, gate_up 3072x16384, down 8192x3072; LoRA r=16 on each
    per_layer = 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    assert report.model["params_trainable"] == 2 * per_layer
