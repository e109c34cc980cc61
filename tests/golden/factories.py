"""Golden-JSON factories: a user's transformers.Trainer script, as `probe-backward FILE:trainer` reads it."""

import os
import tempfile

import torch
from peft import LoraConfig, get_peft_model

from gradflow.setup.presets import build_preset


def trainer():
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(build_preset("tiny-llama", seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9, 10]] * 4, "labels": [[5, 6, 7, 8, 9, 10]] * 4})
    out = os.environ.get("GOLDEN_OUT") or tempfile.mkdtemp(prefix="golden-")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, gradient_checkpointing=True)
    return {"trainer": Trainer(model=model, args=args, train_dataset=ds), "trainable": "lora_"}
