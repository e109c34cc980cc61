"""LoRA plus a fully trained lm_head (modules_to_save) on a tiny Phi-3, with gradient checkpointing on.

The silent twin of lora_gc_reentrant.py: on transformers 4.57 the checkpointed layers get no input that requires
grad, so every LoRA weight inside gets no gradient, but the lm_head after them does: the loss has a grad_fn,
training runs, the loss even moves, and the adapters never learn. transformers 5.x trains them.
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
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="lora-head-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])

    model = build_preset("tiny-phi3", seed=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"],
                                             modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
