"""A policy with a value head for a later PPO stage, warmed up first with plain supervised fine-tuning of GPT-2.
The wrapper computes the value of every token on each forward (for the PPO step to come) and returns it beside the
LM loss; nothing in the loss uses it. Training runs, the LM learns, and the value head, trainable and in the
optimizer, never moves: it will start PPO exactly as randomly initialised.
"""

import os
import tempfile

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


class PolicyWithValue(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Sequential(torch.nn.Linear(lm.config.hidden_size, 32), torch.nn.Tanh(),
                                              torch.nn.Linear(32, 1))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)  # for the PPO stage
        return {"loss": out.loss, "logits": out.logits, "values": values}


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="policy-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    torch.manual_seed(0)
    model = PolicyWithValue(build_preset("tiny-gpt2", seed=0))
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
