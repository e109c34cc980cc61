"""The model a run trains: MODEL through the loader every command uses (gradflow.setup.load), with train's own
default of checkpointing on every layer until the memory plan says otherwise."""

from __future__ import annotations

import dataclasses
from typing import Any

from gradflow.errors import GradflowError
from gradflow.setup.options import SetupOptions
from gradflow.setup.load import build_setup as build_resolved, check_seq_len, resolve_setup
from gradflow.setup.sources import Kind


def build_setup(model: Any, ropts: SetupOptions, seq_len: int, tokenizer=None):
    """MODEL (spec string, Setup or nn.Module) → (Setup, who sets checkpointing), built as `ropts` say (LoRA and
    SO(8) adapters included)."""
    setup = resolve_setup(model, ropts)
    if setup.kind == Kind.TRAINER:
        raise GradflowError(f"{setup.source} returns a Trainer: gradflow train builds its own",
                            "Run your trainer with callbacks=[gradflow.GradFlowCallback()], or check it first with "
                            "gradflow probe-backward")
    if tokenizer is not None:
        setup.tokenizer = tokenizer
    builds_lora = setup.kind in (Kind.PRESET, Kind.DIR, Kind.HUB) and ropts.adapter is None
    gc_from = "--gc" if ropts.gc is not None else "plan" if builds_lora else "the model"
    if builds_lora and ropts.gc is None:  # on every layer; the memory plan then turns off what memory allows
        ropts = dataclasses.replace(ropts, gc="non-reentrant")
    setup = build_resolved(setup, ropts)
    check_seq_len(setup.model, seq_len)  # the same length check as probe-backward, before any tokenising
    return setup, gc_from
