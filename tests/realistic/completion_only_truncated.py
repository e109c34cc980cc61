"""Completion-only LoRA fine-tune of a tiny GPT-2 with hand-written tokenization: the prompt is masked with -100
and only the answer is learned.

The system prompt in front of every question is longer than `max_length`, so truncation cuts every answer off:
every label in every batch is -100, there is nothing to learn, and the loss is NaN (0 / 0 tokens).
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

SYSTEM = "You are a helpful assistant. Answer in one short, polite sentence.\n"
PAIRS = [("What does the cat do?", "It sits on the mat."), ("Where did the dog run?", "In the park."),
         ("When do birds sing?", "At dawn."), ("What falls on the roof?", "The rain."),
         ("How is the sun today?", "Warm."), ("Where do fish swim?", "In the sea."),
         ("How do trees grow?", "Tall."), ("What covers the hills?", "Snow.")]
MAX_LENGTH = 48


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="completion-")
    tokenizer = build_tokenizer()

    def tokenize(example):
        prompt = tokenizer(SYSTEM + "Q: " + example["prompt"] + "\nA: ")["input_ids"]
        answer = tokenizer(example["completion"] + tokenizer.eos_token)["input_ids"]
        return {"input_ids": (prompt + answer)[:MAX_LENGTH],
                "labels": ([-100] * len(prompt) + answer)[:MAX_LENGTH]}  # learn the answer only

    dataset = Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [c for _, c in PAIRS]})
    dataset = dataset.map(tokenize, remove_columns=["prompt", "completion"])

    model = get_peft_model(build_preset("tiny-gpt2", seed=0),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                                      task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tokenizer))


if __name__ == "__main__":
    build().train()
