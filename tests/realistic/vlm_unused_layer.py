"""A tiny LLaVA fine-tuned with LoRA on every linear layer ("all-linear"), the vision tower's included. LLaVA's
projector reads the vision tower's second-to-last layer (`vision_feature_layer=-2`, its default): the last vision
layer runs on every image and its adapters are in the optimizer, but none of its output reaches the loss. Training
runs, the loss falls, and the last vision layer's adapters never move.
"""

import os
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from tests.helpers.vlm import tiny_llava, vlm_batch


class ImageTextRows(torch.utils.data.Dataset):
    """Eight rows of token ids with four image tokens, one 16x16 image each, and labels."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[0] for k, v in vlm_batch(seed=i).items()}


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="llava-")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(tiny_llava(), config)
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=ImageTextRows())


if __name__ == "__main__":
    build().train()
