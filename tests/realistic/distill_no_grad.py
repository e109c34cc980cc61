"""Distillation from a frozen teacher in a Trainer subclass, full fine-tune of GPT-2.

The KL term is computed inside the teacher's `torch.no_grad()` block, with the student's logits: it has no
gradient. Training runs, the logged loss includes the term, and the student learns exactly what it would learn
without it: the distillation does nothing.
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


class DistillTrainer(Trainer):
    def __init__(self, *args, teacher=None, alpha=0.5, temperature=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        outputs = model(**inputs)
        t = self.temperature
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            kd = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.softmax(teacher_logits / t, -1),
                          reduction="batchmean") * t * t
        loss = outputs.loss + self.alpha * kd
        return (loss, outputs) if return_outputs else loss


def build(output_dir=None, alpha=0.5):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="distill-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return DistillTrainer(model=build_preset("tiny-gpt2", seed=0), teacher=build_preset("tiny-gpt2", seed=1),
                          alpha=alpha, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
