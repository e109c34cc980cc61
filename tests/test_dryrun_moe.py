"""The dry run's twin keeps 2 experts per MoE layer (and toy-width vision towers), yet reports the real model.

Each tiny config here is also built for real, with all its experts, saved with weights, loaded and probed the
ordinary way; the dry run reads only its config.json. The parameter names (every expert's, `experts.7.down_proj`
included on transformers 4.x, where experts are a ModuleList), the module rows and the parameter counts must be the
real model's, while the twin holds fewer experts than the config.
"""

from __future__ import annotations

import pytest

from gradflow.dryrun import dry_run
from gradflow.setup.build import SetupOptions
from gradflow.setup.twin import shrink_config
from gradflow.setup.twin_experts import TWIN_EXPERTS, expert_count

OPTS = dict(device="cpu", lora_r=4, lora_targets="all-linear", gc="reentrant")


def _mixtral():
    from transformers import MixtralConfig

    # 8 experts, top-8: every expert gets tokens in the real model too, so gradients compare one to one
    return MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=8,
                         max_position_embeddings=128, tie_word_embeddings=False)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    # top-2 of 6: some real experts may get no token from a 32-token batch; names and counts still match
    return Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_experts=6, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)


def _deepseek_v3():
    from transformers import DeepseekV3Config

    # MLA attention, one dense layer then MoE with a shared expert and group-limited routing (2 groups, top-4 of 8)
    return DeepseekV3Config(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                            num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4,
                            n_group=2, topk_group=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)


def _gemma3_vlm():
    from transformers import Gemma3Config

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=128)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                        boi_token_index=297, eoi_token_index=298)


CONFIGS = {"mixtral": _mixtral, "qwen3-moe": _qwen3_moe, "deepseek-v3": _deepseek_v3, "gemma3-vlm": _gemma3_vlm}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, config, folder): the tiny model built with all its experts and saved with weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = CONFIGS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return request.param, config, folder


def _real(folder, opts):
    import gradflow
    from gradflow.setup.load import load_setup, make_batch

    setup = load_setup(str(folder), opts)
    batch = make_batch(setup, data=None, batch_size=2, seq_len=16, seed=0)
    return gradflow.probe(setup.model, batch, trainable=setup.trainable)


def _rows(report):
    return {m["name"]: (m["class"], m["trainable"], m["frozen"]) for m in report.modules}


def test_dry_run_reports_every_real_expert(saved):
    name, config, folder = saved
    opts = SetupOptions(**OPTS)
    real = _real(folder, opts)
    dry = dry_run(str(folder / "config.json"), SetupOptions(**OPTS), seq_len=16)

    for key in ("params_total", "params_trainable", "class"):
        assert dry.model[key] == real.model[key], key
    real_params = {p["name"]: p["grad"] for p in real.params["per_param"]}
    dry_params = {p["name"]: p["grad"] for p in dry.params["per_param"]}
    assert list(dry_params) == list(real_params)  # every expert's names, in the real order
    assert _rows(dry) == _rows(real)  # module rows: names, classes and per-module counts
    assert dry.extra["dry_run"]["unmapped_count"] == 0
    if name in ("mixtral", "gemma3-vlm"):  # every expert routed in the real model too: the same gradients
        assert dry_params == real_params
        assert [(f.slug, f.severity, f.location) for f in dry.findings] == \
            [(f.slug, f.severity, f.location) for f in real.findings]
    else:  # routing decides which real experts a 32-token batch reaches; the twin's all get a gradient
        assert {g for g in dry_params.values()} == {"ok", "zero"}  # zero: LoRA's zero-init lora_A


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "deepseek-v3"])
def test_twin_has_fewer_experts_than_the_config(name):
    config = CONFIGS[name]()
    twin = shrink_config(config, min_hidden=4)
    assert expert_count(config) > TWIN_EXPERTS == expert_count(twin)
    assert twin.num_experts_per_tok <= TWIN_EXPERTS
    assert expert_count(config) == expert_count(CONFIGS[name]())  # the real config is left as it was


def test_twin_shrinks_the_vision_tower_and_keeps_its_depth():
    config = _gemma3_vlm()
    twin = shrink_config(config, min_hidden=4)
    assert twin.vision_config.num_hidden_layers == config.vision_config.num_hidden_layers
    assert twin.vision_config.hidden_size < config.vision_config.hidden_size
    assert twin.vision_config.intermediate_size < config.vision_config.intermediate_size
    assert twin.text_config.vocab_size <= 256 and twin.image_token_index < twin.text_config.vocab_size


def test_real_sized_moe_reports_all_experts(tmp_path):
    """A 64-expert config: the twin builds 2, the report names experts.63 and counts all 64 (checked by arithmetic on
    the config, not by building the model)."""
    from transformers import Qwen3MoeConfig

    hidden, moe, layers, experts, vocab = 64, 40, 2, 64, 500
    Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, moe_intermediate_size=moe,
                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_experts=experts, num_experts_per_tok=8, tie_word_embeddings=False).save_pretrained(tmp_path)
    report = dry_run(str(tmp_path), SetupOptions(device="cpu", lora_r=0, gc="off"), seq_len=16)
    attn = hidden * 4 * 16 + 2 * hidden * 2 * 16 + 4 * 16 * hidden + 2 * 16  # q, k, v, o, q_norm, k_norm
    per_layer = attn + experts * hidden + experts * 3 * hidden * moe + 2 * hidden  # router, experts, 2 norms
    assert report.model["params_total"] == 2 * vocab * hidden + layers * per_layer + hidden
    names = [m["name"] for m in report.modules]
    assert any(n.endswith("layers.1.mlp.experts") for n in names)
    if any(".experts.0." in n for n in names):  # transformers 4.x: one module per expert
        assert sum(n.endswith(".down_proj") and ".experts." in n for n in names) == layers * experts
