"""Stage two of a LoRA fine-tune: reload the stage-one adapter and keep training it.

PeftModel.from_pretrained loads an adapter for inference unless it is told `is_trainable=True`: every LoRA
weight comes back frozen, the Trainer has nothing to train, and backward raises "element 0 of tensors does not
require grad" on both stacks.
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


def stage_one_adapter(directory):
    """What stage one left behind: a LoRA adapter written by save_pretrained."""
    model = get_peft_model(build_preset("tiny-llama", seed=0),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(directory)
    return directory


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="stage2-")
    adapter_dir = stage_one_adapter(os.path.join(output_dir, "stage1-adapter"))
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])

    model = PeftModel.from_pretrained(build_preset("tiny-llama", seed=0), adapter_dir)
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def gradflow_check():
    """For `gradflow probe-backward adapter_resume_frozen.py:gradflow_check`: the run, and what it means to train."""
    return {"trainer": build(), "trainable": r"lora_"}


if __name__ == "__main__":
    build().train()
