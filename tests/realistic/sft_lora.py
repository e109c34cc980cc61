"""TRL's SFTTrainer with a peft_config on a tiny Phi-3 (SFTConfig checkpoints by default): trains on both stacks."""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="sft-")
    args = SFTConfig(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     max_length=32, gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, disable_tqdm=True)
    return SFTTrainer(model=build_preset("tiny-phi3", seed=0), args=args,
                      train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=build_tokenizer(),
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))


if __name__ == "__main__":
    build().train()
