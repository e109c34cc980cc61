"""Run by tests/rules/test_fsdp_trainer_plan.py under torchrun (2 gloo processes): Trainers whose TrainingArguments
ask for FSDP1, probed with gradflow.probe. transformers refuses `fsdp` outside a distributed launch ("Using fsdp
only works in distributed training"), so the Trainer exists only under torchrun; on CPU accelerate then drops its
FSDP plugin and gradflow judges the FSDP1 plan the args describe. Rank 0 writes {case: result} as JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import gradflow
from gradflow.setup.presets import build_preset, build_tokenizer

LAYER = "LlamaDecoderLayer"
SLUGS = ("fsdp-mixed-requires-grad", "fsdp-mixed-dtype")


def trainer(model, out, **config):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = build_tokenizer()
    ds = Dataset.from_dict({"text": [f"sample {i} says hello to the world" for i in range(4)]})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    # FSDP1: `fsdp_version` becomes fsdp_config["version"] on 5.x; 4.57 has no such key (accelerate reads
    # FSDP_VERSION, 1 by default). sync_module_states needs an accelerator device: off on CPU.
    fsdp_config = {"fsdp_version": 1, "transformer_layer_cls_to_wrap": [LAYER], "sync_module_states": False, **config}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, fsdp="full_shard auto_wrap", fsdp_config=fsdp_config)
    return Trainer(model=model, args=args, train_dataset=ds,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def sft_trainer(out, targets):
    """TRL's SFTTrainer, which adds the LoRA itself (peft_config), with the same FSDP1 settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"text": [f"sample {i} says hello to the world" for i in range(4)]})
    config = {"fsdp_version": 1, "transformer_layer_cls_to_wrap": [LAYER], "sync_module_states": False,
              "use_orig_params": False}
    args = SFTConfig(output_dir=out, per_device_train_batch_size=2, max_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, max_length=32, fsdp="full_shard auto_wrap", fsdp_config=config)
    return SFTTrainer(model=build_preset("tiny-llama"), args=args, train_dataset=ds, processing_class=build_tokenizer(),
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))


def judged(t) -> dict:
    report = gradflow.probe(t)
    found = [f for f in report.findings if f.slug in SLUGS]
    return {"findings": [{"slug": f.slug, "location": f.location, "message": f.message, "params": f.params}
                         for f in found],
            "units": [{"module": u.module, "kind": u.kind, "use_orig_params": u.use_orig_params, "planned": u.planned,
                       "param_dtype": u.param_dtype, "params": len(u.params)} for u in report.snapshot.wrappers],
            "accelerate_fsdp": getattr(t.accelerator.state, "fsdp_plugin", None) is not None}


def wrap_error(model, policy, **options) -> str | None:
    """What FSDP1 itself says when it wraps `model` as the plan says (no collective runs before it refuses)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), **options)
    except ValueError as exc:
        return str(exc)
    return None


def layer_policy(model):
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer = type(model.get_base_model().model.layers[0] if hasattr(model, "get_base_model") else model.model.layers[0])
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer})  # what accelerate builds


def main(path: str) -> None:
    from peft import LoraConfig, get_peft_model

    out, results = os.path.dirname(path), {}

    def frozen_embeddings():  # a full fine-tune with the input embeddings frozen
        model = build_preset("tiny-llama")
        model.model.embed_tokens.requires_grad_(False)
        return model

    model = frozen_embeddings()
    results["frozen_embed"] = judged(trainer(model, out, use_orig_params=False))
    results["frozen_embed"]["wrap_error"] = wrap_error(model, layer_policy(model), use_orig_params=False)
    results["frozen_embed_orig_params"] = judged(trainer(frozen_embeddings(), out, use_orig_params=True))

    # LoRA on the embeddings too: PEFT's wrap policy (which the Trainer swaps in) gives the Linear adapters units of
    # their own, but lora_embedding_A/B are parameters of the embedding's LoRA layer, in the root unit
    lora = get_peft_model(build_preset("tiny-llama"), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                 target_modules=["q_proj", "v_proj", "embed_tokens"]))
    results["lora_embed"] = judged(trainer(lora, out, use_orig_params=False))
    from peft.utils.other import fsdp_auto_wrap_policy

    results["lora_embed"]["wrap_error"] = wrap_error(lora, fsdp_auto_wrap_policy(lora), use_orig_params=False)
    lora = get_peft_model(build_preset("tiny-llama"), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                                 target_modules=["q_proj", "v_proj"]))
    results["lora_linear"] = judged(trainer(lora, out, use_orig_params=False))
    results["sft_lora_embed"] = judged(sft_trainer(out, ["q_proj", "v_proj", "embed_tokens"]))
    results["sft_lora_linear"] = judged(sft_trainer(out, ["q_proj", "v_proj"]))

    def bf16_fp32_head():  # a bf16 model whose output head is kept in fp32
        model = build_preset("tiny-llama", dtype=torch.bfloat16)
        model.lm_head.float()
        return model

    model = bf16_fp32_head()
    results["fp32_head"] = judged(trainer(model, out, use_orig_params=True))
    results["fp32_head"]["wrap_error"] = wrap_error(model, layer_policy(model), use_orig_params=True)
    results["all_bf16"] = judged(trainer(build_preset("tiny-llama", dtype=torch.bfloat16), out, use_orig_params=True))

    os.environ["FSDP_VERSION"] = "2"  # 4.57 reads the version from here; 5.x from fsdp_config
    results["version_2"] = judged(trainer(frozen_embeddings(), out, fsdp_version=2, use_orig_params=False))
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
