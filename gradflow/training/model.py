"""The model a run trains: MODEL through the loader every command uses (gradflow.setup.load), with train's own
defaults (checkpointing on every layer until the memory plan says otherwise) and the SO(8) adapters."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gradflow.errors import GradflowError
from gradflow.setup.build import SetupOptions, apply_lora
from gradflow.setup.load import build_setup as build_resolved, check_lora_flags, check_seq_len, resolve_setup
from gradflow.setup.sources import Kind
from gradflow.training import so8
from gradflow.training.options import TrainOptions


# ----- the model --------------------------------------------------------------------------------------------
def build_setup(model: Any, ropts: SetupOptions, opts: TrainOptions, tokenizer=None):
    """MODEL (spec string, Setup or nn.Module) → (Setup, who sets checkpointing), through the loader every command
    uses (gradflow.setup.load), with LoRA and SO(8) adapters applied."""
    setup = resolve_setup(model, ropts)
    if setup.kind == Kind.TRAINER:
        raise GradflowError(f"{setup.source} returns a Trainer: gradflow train builds its own",
                            "Run your trainer with callbacks=[gradflow.GradFlowCallback()], or check it first with "
                            "gradflow probe-backward")
    if tokenizer is not None:
        setup.tokenizer = tokenizer
    builds_lora = setup.kind in (Kind.PRESET, Kind.DIR, Kind.HUB) and ropts.adapter is None
    gc_from = "--gc" if ropts.gc is not None else "plan" if builds_lora else "the model"
    if builds_lora and ropts.gc is None:
        ropts.gc = "non-reentrant"  # on every layer; the memory plan then turns off what memory allows
    if opts.so8_layers:
        if not builds_lora or (setup.kind == Kind.DIR and os.path.isfile(os.path.join(setup.source,
                                                                                    "adapter_config.json"))):
            raise GradflowError("--so8-layers needs a base model that gradflow adds LoRA to (a preset, directory "
                                "or hub id, without --adapter)", "Drop --so8-layers, or start from the base model")
        rank_ = ropts.lora_r if ropts.lora_r is not None else 8
        if rank_ == 0:
            raise GradflowError("--so8-layers rides on a LoRA adapter, and --lora-r is 0",
                                "Pass --lora-r 8 (or any positive rank)")
        check_lora_flags(setup, ropts)
        setup = build_resolved(setup, dataclasses.replace(ropts, lora_r=0), check_flags=False)

        so8.install(setup.model, opts.so8_layers)
        setup.model = apply_lora(setup.model, rank_, ropts.lora_alpha or 2 * rank_, ropts.lora_targets or "all-linear",
                                 modules_to_save=[so8.MODULE_NAME])
        so8.attach_hooks(setup.model)
    else:
        setup = build_resolved(setup, ropts)
    check_seq_len(setup.model, opts.seq_len)  # the same length check as probe-backward, before any tokenising
    return setup, gc_from
