"""The bench's other peers (issue 19): Unsloth, and TRL with liger-kernel, each with its own recommended settings on
the data, model shape and LoRA every run shares (bench/compare_factory.py). Run by bench/train_compare.py's worker.

- `d-liger`: TRL SFTTrainer exactly as run d (packing bfd, padding-free, flex_attention), plus
  `use_liger_kernel=True`: Trainer applies liger's kernels to the base model (RMSNorm, RoPE, SwiGLU, and the fused
  linear cross-entropy, which never materialises the logits). Needs `liger-kernel` (PyPI) and Triton.
- `unsloth`: Unsloth's recipe from its notebooks: `FastLanguageModel.from_pretrained` (bf16, or load_in_4bit for
  --qlora) on the same random-init weights (saved to a temporary directory with the tokenizer), `get_peft_model`
  with r16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down (Phi-3's fused qkv_proj / gate_up_proj where the
  model has them), `use_gradient_checkpointing="unsloth"`, then TRL's SFTTrainer with its padding-free packing and
  `optim="adamw_8bit"`. `unsloth` must be imported before transformers, trl and peft (it patches them): the worker
  imports it first (`import_first`).
A peer that cannot run (not installed, no GPU kernels, an unsupported architecture) fails with the exception as it
was raised: the parent records it beside the other runs, and the run stays in the script.
"""

from __future__ import annotations

import json
import tempfile

UNSLOTH_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def import_first(run: str) -> None:
    """Before the worker imports transformers: Unsloth patches transformers, TRL and PEFT when imported first."""
    if run == "unsloth":
        import unsloth  # noqa: F401  (an ImportError here is the run's reported failure)


def _dataset(cfg):
    from datasets import Dataset

    with open(cfg.data) as fh:
        return Dataset.from_list([{"messages": json.loads(line)["messages"]} for line in fh])


def _sft_config(cfg, common: dict, **extra):
    import dataclasses as dc

    from trl import SFTConfig

    fields = {f.name for f in dc.fields(SFTConfig)}
    kwargs = {**common, "max_length": cfg.seq_len, "assistant_only_loss": cfg.loss_on == "completion",
              "packing": True, "packing_strategy": "bfd", "padding_free": True, **extra}
    dropped = sorted(k for k in kwargs if k not in fields)
    if dropped:
        print(f"train_compare: this TRL has no {', '.join(dropped)}", flush=True)
    return SFTConfig(**{k: v for k, v in kwargs.items() if k in fields})


def run_trl_liger(cfg, tok, factory, common: dict, marks) -> None:
    """TRL packing + flex_attention (run d) with use_liger_kernel=True."""
    import liger_kernel  # noqa: F401  (not installed: this ImportError is the run's reported failure)
    from trl import SFTTrainer

    model = factory.lora(factory.base_model(cfg.preset, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant,
                                            attn=cfg.attn_packed))
    marks("model")
    trainer = SFTTrainer(model=model, args=_sft_config(cfg, common, use_liger_kernel=True),
                         train_dataset=_dataset(cfg), processing_class=tok)
    marks("data_and_trainer")
    trainer.train()


def run_unsloth(cfg, tok, factory, common: dict, marks) -> None:
    """Unsloth's recipe (module docstring) on the shared weights."""
    import torch
    from unsloth import FastLanguageModel
    from trl import SFTTrainer

    with tempfile.TemporaryDirectory(prefix="gradflow-bench-unsloth-") as tmp:
        base = factory.base_model(cfg.preset, device="cpu", dtype=cfg.dtype)  # the shared weights, to load
        base.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del base
        model, _ = FastLanguageModel.from_pretrained(model_name=tmp, max_seq_length=cfg.seq_len,
                                                     dtype=getattr(torch, cfg.dtype),
                                                     load_in_4bit=cfg.quant == "4bit", local_files_only=True)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in UNSLOTH_TARGETS if t in names] + [t for t in ("qkv_proj", "gate_up_proj") if t in names]
    model = FastLanguageModel.get_peft_model(model, r=factory.LORA_R, lora_alpha=factory.LORA_ALPHA,
                                             lora_dropout=0.0, bias="none", target_modules=targets,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    marks("model")
    args = _sft_config(cfg, common, optim="adamw_8bit", dataset_num_proc=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(cfg), processing_class=tok)
    marks("data_and_trainer")
    trainer.train()


RUNNERS = {"d-liger": run_trl_liger, "unsloth": run_unsloth}


def wheels_note() -> str:
    """Where the peers' packages come from, for the failure message."""
    return ("pip install liger-kernel (d-liger) / pip install unsloth unsloth_zoo (unsloth); offline: "
            "pip install --no-deps the wheels listed in docs/benchmarks.md")


if __name__ == "__main__":  # which of the peers import here, and why not
    for name, module in (("d-liger", "liger_kernel"), ("unsloth", "unsloth")):
        try:
            __import__(module)
            print(f"{name}: {module} imports")
        except Exception as exc:  # the exact reason, as the run would report it
            print(f"{name}: {type(exc).__name__}: {exc}")
