"""LoRA on a tiny Llama with gradient checkpointing switched on in TrainingArguments.

The classic: get_peft_model runs before the Trainer turns checkpointing on, so on transformers 4.57 (reentrant
checkpointing by default) nothing makes the embedding output require grad and backward raises
"element 0 of tensors does not require grad". transformers 5.x checkpoints non-reentrantly: it trains.
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="lora-gc-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])

    model = build_preset("tiny-llama", seed=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
