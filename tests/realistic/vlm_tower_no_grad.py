"""A tiny LLaVA with LoRA on the attention of both towers (q_proj / v_proj, the vision tower's included), meant to
adapt the vision tower too. An earlier experiment froze the tower, and to save memory wrapped the model's
`get_image_features` in `torch.no_grad()`; that line stayed. Training runs, the text adapters learn, and the vision
tower's adapters never move: their output is computed without a graph.
"""

import os
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Trainer,
                          TrainingArguments)


IMAGE_TOKEN, VOCAB = 5, 128


def tiny_llava(feature_layer=-2):
    """A LlavaForConditionalGeneration with random weights: 2 CLIP layers (16x16 images, 4 patches), 2 Llama layers;
    the projector reads vision layer `feature_layer`."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer))


class ImageTextRows(torch.utils.data.Dataset):
    """Eight rows of token ids with four image tokens, one 16x16 image each, and labels."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(10, VOCAB, (12,), generator=gen)
        ids[1:5] = IMAGE_TOKEN
        pixels = torch.randn(3, 16, 16, generator=gen)
        labels = ids.clone()
        labels[ids == IMAGE_TOKEN] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="llava-")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny_llava(feature_layer=-1), config)
    llava = model.get_base_model().model
    llava.get_image_features = torch.no_grad()(llava.get_image_features)  # "the tower is frozen: save memory"
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=ImageTextRows())


if __name__ == "__main__":
    build().train()
