"""A tiny real vision-language model (LLaVA: a CLIP vision tower, a projector and a Llama), built locally with
random weights and fixed seeds, and its batches: image tokens in the text, or text only."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 5
VOCAB = 128
# LoRA on the attention of both towers (CLIP and Llama name q_proj / v_proj alike)
VISION_LORA = ["q_proj", "v_proj"]


def tiny_llava(*, feature_layer: int = -2, seed: int = 0):
    """LlavaForConditionalGeneration: 2 vision layers (16x16 images, 4 patches), 2 text layers. `feature_layer`
    is the vision layer the projector reads (LLaVA's default, -2, leaves the tower's last layer unused)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=feature_layer)
    return LlavaForConditionalGeneration(config)


def vlm_batch(*, images: bool = True, batch_size: int = 1, seq_len: int = 12, seed: int = 0) -> dict:
    """Token ids with 4 image tokens and one 16x16 image per row, or (images=False) text only."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (batch_size, seq_len), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        ids[:, 1:5] = IMAGE_TOKEN
        out["pixel_values"] = torch.randn(batch_size, 3, 16, 16, generator=gen)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    out["labels"] = labels
    return out


def unused_layer_factory():
    """A factory for the CLI (`tests/helpers/vlm.py:unused_layer_factory`): LoRA on every linear layer of a LLaVA
    whose projector reads vision layer -2, with an image batch."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    return {"model": get_peft_model(tiny_llava(), config), "batch": vlm_batch()}


def used_layer_factory():
    """The same with the projector reading the last vision layer: every adapter reaches the loss."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=VISION_LORA, lora_dropout=0.0)
    return {"model": get_peft_model(tiny_llava(feature_layer=-1), config), "batch": vlm_batch()}
