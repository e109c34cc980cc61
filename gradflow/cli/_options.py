"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Preset (tiny-phi3, …), save_pretrained directory, hub id, or FILE.py:FUNC / module:FUNC factory.", show_default=False)]

LoraR = Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank; 0 = no LoRA. Default: 8 for presets/dirs/hub ids, none for factories.", rich_help_panel="Setup")]
LoraAlpha = Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha (default 2×rank).", rich_help_panel="Setup")]
LoraTargets = Annotated[Optional[str], typer.Option("--lora-targets", help="Comma-separated module names, or all-linear.", rich_help_panel="Setup")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="Load a PEFT adapter directory onto the model.", rich_help_panel="Setup")]
AdapterTrainable = Annotated[bool, typer.Option("--adapter-trainable", help="Load --adapter trainable (is_trainable=True).", rich_help_panel="Setup")]
Quant = Annotated[str, typer.Option("--quant", help="none | 4bit | 8bit (bitsandbytes).", rich_help_panel="Setup")]
GC = Annotated[Optional[str], typer.Option("--gc", help="Gradient checkpointing: off | reentrant | non-reentrant. Default: as the model is.", rich_help_panel="Setup")]
DType = Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16 (default: the model's).", rich_help_panel="Setup")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (auto picks CUDA when present).", rich_help_panel="Setup")]
Trainable = Annotated[Optional[str], typer.Option("--trainable", help="Regex naming the parameters you intend to train.", rich_help_panel="Setup")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow custom code: model code from the directory or hub, and a factory that an adapter config or run metadata names as the base.", rich_help_panel="Setup")]

Data = Annotated[Optional[str], typer.Option("--data", help="JSONL file: build the probe batch from real samples.", rich_help_panel="Probe")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Probe batch size.", rich_help_panel="Probe")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Probe sequence length.", rich_help_panel="Probe")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for init and synthetic batches.", rich_help_panel="Probe")]

FailOn = Annotated[str, typer.Option("--fail-on", help="Exit 1 on findings at or above: error | warning | never.")]


def setup_options(lora_r, lora_alpha, lora_targets, adapter, adapter_trainable, quant, gc, dtype, device, trainable,
                  trust_remote_code, seed=0):
    """RecipeOptions from the shared CLI options (validated)."""
    from gradflow.recipe import RecipeOptions

    opts = RecipeOptions(lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets, adapter=adapter,
                         adapter_trainable=adapter_trainable, quant=quant, gc=gc, dtype=dtype, device=device,
                         trainable=trainable, trust_remote_code=trust_remote_code, seed=seed)
    opts.validate()
    return opts


def check_choice(value: str, choices, flag: str) -> None:
    from gradflow.errors import GradflowError

    if value not in choices:
        raise GradflowError(f"{flag} {value!r} is not one of {', '.join(choices)}", "Pick one of those")


def check_positive(value: int, flag: str, example: int = 2) -> None:
    """A positive integer, within gradflow.limits' bound for `flag` when it has one."""
    from gradflow.errors import GradflowError
    from gradflow.limits import INTS, check_int

    if flag in INTS:
        check_int(flag, value)
    elif value <= 0:
        raise GradflowError(f"{flag} must be a positive integer, got {value}", f"Pass e.g. {flag} {example}")
