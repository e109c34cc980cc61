"""A LoRA fine-tune with two adapters: 'default' to train, and a 'judge' adapter loaded beside it. The Trainer
subclass scores each batch with the judge inside compute_loss, calling `model.set_adapter("judge")`, and then
computes the training loss... on the judge adapter, which set_adapter made trainable and 'default' frozen. The
optimizer holds only 'default': training runs, the loss moves a little with nothing, and no weight changes.
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


class JudgedTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        model.set_adapter("judge")  # score with the judge... and forget to switch back
        outputs = model(**inputs)
        loss = outputs.loss
        return (loss, outputs) if return_outputs else loss


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="judged-")
    tokenizer = build_tokenizer()
    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(build_preset("tiny-llama", seed=0), config)
    model.add_adapter("judge", config)
    model.set_adapter("default")
    args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return JudgedTrainer(model=model, args=args, train_dataset=dataset,
                         data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


if __name__ == "__main__":
    build().train()
