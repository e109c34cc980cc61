"""packed-attention-leak as users meet it: a transformers.Trainer with transformers' own padding-free collator
(DataCollatorWithFlattening: input_ids, labels and position_ids, no attention_mask), probed through the Trainer."""

from __future__ import annotations

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import gradflow
from gradflow.setup.presets import build_preset

SLUG = "packed-attention-leak"


class OnesMaskCollator(DataCollatorWithFlattening):
    """A user's tweak: an attention_mask of ones over the flattened row (it looks harmless, and masks nothing)."""

    def __call__(self, features, *args, **kwargs):
        batch = super().__call__(features, *args, **kwargs)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch


def _trainer(tmp_path, *, use_cache: bool, gc: bool, collator=None) -> Trainer:
    model = build_preset("tiny-llama", seed=0)
    model.config.use_cache = use_cache
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (12, 9, 15, 7):
        ids = torch.randint(3, 500, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to="none",
                             use_cpu=True, gradient_checkpointing=gc, remove_unused_columns=False,
                             gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator or DataCollatorWithFlattening())


def test_a_cache_in_training_leaks_where_the_trainer_keeps_it(tmp_path):
    """transformers 4.57's Trainer keeps use_cache on, so the forward builds a cache and the packed-sequence mask is
    skipped; 5.x's Trainer turns the cache off for training, and the boundaries hold."""
    report = gradflow.probe(_trainer(tmp_path, use_cache=True, gc=False))
    check = report.to_dict()["packed_check"]
    if int(transformers.__version__.split(".")[0]) < 5:
        found = [f for f in report.findings if f.slug == SLUG]
        assert found and "cache" in found[0].message, report.slugs()
        assert check["causes"] == ["cache"]
    else:
        assert SLUG not in report.slugs() and check["cache_created"] is False and check["checked"] >= 1


def test_an_attention_mask_of_ones_leaks_on_both_stacks(tmp_path):
    report = gradflow.probe(_trainer(tmp_path, use_cache=False, gc=False, collator=OnesMaskCollator()))
    found = [f for f in report.findings if f.slug == SLUG]
    assert found and "attention_mask" in found[0].message, report.slugs()
    assert report.to_dict()["packed_check"]["causes"] == ["attention-mask"]


def test_the_same_trainer_without_a_cache_keeps_the_boundaries(tmp_path):
    report = gradflow.probe(_trainer(tmp_path, use_cache=False, gc=False))
    assert SLUG not in report.slugs()
    check = report.to_dict()["packed_check"]
    assert check["checked"] >= 1 and check["leaks"] == []
