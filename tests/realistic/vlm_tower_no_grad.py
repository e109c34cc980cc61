"""A tiny LLaVA with LoRA on the attention of both towers (q_proj / v_proj, the vision tower's included), meant to
adapt the vision tower too. An earlier experiment froze the tower, and to save memory wrapped the model's
`get_image_features` in `torch.no_grad()`; that line stayed. Training runs, the text adapters learn, and the vision
tower's adapters never move: their output is computed without a graph.
"""

import os
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from tests.helpers.vlm import VISION_LORA, tiny_llava, vlm_batch


class ImageTextRows(torch.utils.data.Dataset):
    """Eight rows of token ids with four image tokens, one 16x16 image each, and labels."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[0] for k, v in vlm_batch(seed=i).items()}


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="llava-")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=VISION_LORA, lora_dropout=0.0)
    model = get_peft_model(tiny_llava(feature_layer=-1), config)
    llava = model.get_base_model().model
    llava.get_image_features = torch.no_grad()(llava.get_image_features)  # "the tower is frozen: save memory"
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=ImageTextRows())


if __name__ == "__main__":
    build().train()
