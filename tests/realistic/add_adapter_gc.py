"""transformers' own PEFT integration: `model.add_adapter(LoraConfig(...))`, then a Trainer with reentrant
gradient checkpointing. transformers makes the inputs require grad itself for such a model, so it trains on 4.57.
On transformers 5.x, add_adapter asks for PEFT >= 0.22, newer than that stack's 0.21: build() raises there.
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="add-adapter-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])

    model = build_preset("tiny-phi3", seed=0)
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
