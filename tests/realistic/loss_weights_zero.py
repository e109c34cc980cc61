"""A Trainer subclass that weights each token's loss (full fine-tune of GPT-2). The collator builds the weights
with `torch.zeros_like(input_ids)`, so they are integers, and the 0.5 given to every supervised token is truncated
to 0. The loss is 0.0 from the first step, training runs to the end, and nothing moves.
"""

import os
import tempfile

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


class WeightedCollator(DataCollatorForLanguageModeling):
    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        weights = torch.zeros_like(batch["input_ids"])
        weights[batch["labels"] != -100] = 0.5  # down-weight every token equally... as an integer tensor
        batch["loss_weights"] = weights
        return batch


class WeightedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        weights = inputs.pop("loss_weights")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1]
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                    ignore_index=-100, reduction="none")
        w = weights[:, 1:].reshape(-1)
        loss = (per_token * w).sum() / w.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="weighted-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    model = build_preset("tiny-gpt2", seed=0)
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    return WeightedLossTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=WeightedCollator(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
