"""A Trainer subclass with a label-smoothed loss computed on an fp32 copy of the logits, full fine-tune of GPT-2.

The copy is taken with `.detach()`, so the loss no longer depends on the model; backward then raised "element 0
of tensors does not require grad", and `requires_grad_()` on the loss made that go away. The run is quiet, the
loss is logged, and no weight ever moves.
"""

import os
import tempfile

import torch.nn.functional as F
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


class SmoothedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.detach().float()  # fp32 copy for a stable loss
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=0.1)
        loss.requires_grad_()  # backward() said "does not require grad" without this
        return (loss, outputs) if return_outputs else loss


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="smoothed-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])

    model = build_preset("tiny-gpt2", seed=0)
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return SmoothedLossTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
