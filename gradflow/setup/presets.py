"""Built-in presets: tiny random-init models built locally, and a byte-level tokenizer with chat tokens."""

from __future__ import annotations

from typing import Callable

# Chat and /think special tokens every preset tokenizer carries.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
THINK_TOKENS = [
    "<think-task>", "</think-task>", "<think-safety>", "</think-safety>",
    "<think-policy>", "</think-policy>", "<final>", "</final>",
]
# The assistant turn is wrapped in generation tags so the loss mask can come from the template itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _phi3(size: str):
    from transformers import Phi3Config

    if size == "real":  # Phi-3.5-mini's shapes (3.8B parameters)
        return Phi3Config(
            vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            pad_token_id=32000, bos_token_id=1, eos_token_id=32000, tie_word_embeddings=False,
        )
    return Phi3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def _llama(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(  # grouped-query attention: 4 query heads share 2 key/value heads
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def _gpt2(size: str):
    from transformers import GPT2Config

    return GPT2Config(  # Conv1D projections (c_attn, c_proj, c_fc)
        vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _mixtral(size: str):
    from transformers import MixtralConfig

    return MixtralConfig(  # mixture of experts: 4 experts, 2 routed per token
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )


PRESETS: dict[str, tuple[Callable[[str], object], str, str]] = {
    "tiny-phi3": (_phi3, "tiny", "Phi-3 layout: fused qkv_proj and gate_up_proj, 4 layers"),
    "tiny-llama": (_llama, "tiny", "Llama with grouped-query attention, 4 layers"),
    "tiny-gpt2": (_gpt2, "tiny", "GPT-2 with Conv1D projections, 4 layers"),
    "tiny-mixtral": (_mixtral, "tiny", "Mixtral mixture of experts, 4 experts top-2, 2 layers"),
    "phi3.5-mini-shape": (_phi3, "real", "Phi-3.5-mini's real shapes (3.8B), random init: for GPU runs"),
}


def preset_config(name: str, *, training: bool = False):
    """The transformers config of preset `name`.

    `training=True` is the preset as a MODEL argument gives it, a healthy set-up ready to train: use_cache off, so a
    training forward builds no KV cache (one that would also skip the packed-sequence mask). Without it, the config
    keeps transformers' defaults (use_cache on), as `from_pretrained` gives a user's model: demos and tests build
    their faults on that.
    """
    build, size, _ = PRESETS[name]
    config = build(size)
    if training:
        config.use_cache = False
    return config


def build_preset(name: str, *, dtype=None, device=None, seed: int = 0, training: bool = False):
    """A random-init causal LM for preset `name`, built directly on `device` in `dtype` (`training`: see
    preset_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name, training=training)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    return model


def build_tokenizer(vocab_size: int = 512):
    """A byte-level tokenizer built locally (no download), with chat and /think special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", bos_token="<|system|>",
        additional_special_tokens=CHAT_TOKENS[:3] + THINK_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) > vocab_size:
        raise ValueError(f"tokenizer has {len(fast)} tokens, more than the vocab size {vocab_size}")
    return fast
