"""Options shared by several commands, defined once."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import List, Optional

import typer
from typing_extensions import Annotated

from gradflow import choices as c
from gradflow.report import Detail as _Detail

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Preset (tiny-phi3, …), save_pretrained directory, hub id, or FILE.py:FUNC / module:FUNC factory.", show_default=False)]

LoraR = Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank; 0 = no LoRA. Default: 8 for presets/dirs/hub ids, none for factories.", rich_help_panel="Setup")]
LoraAlpha = Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha (default 2×rank).", rich_help_panel="Setup")]
LoraTargets = Annotated[Optional[str], typer.Option("--lora-targets", help="Comma-separated module names, or all-linear.", rich_help_panel="Setup")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="Load a PEFT adapter directory onto the model.", rich_help_panel="Setup")]
AdapterTrainable = Annotated[bool, typer.Option("--adapter-trainable", help="Load --adapter trainable (is_trainable=True).", rich_help_panel="Setup")]
# choice options: the Enum types in gradflow.choices make them real choices in --help; their parse() gives the one
# message for a bad value (a GradflowError: one line, exit 2), the same the library gives
Quant = Annotated[c.Quant, typer.Option("--quant", parser=c.Quant.parse, help="bitsandbytes quantization of the base model.", rich_help_panel="Setup")]
GC = Annotated[Optional[c.GC], typer.Option("--gc", parser=c.GC.parse, help="Gradient checkpointing. Default: as the model is.", rich_help_panel="Setup")]
DType = Annotated[Optional[c.DType], typer.Option("--dtype", parser=c.DType.parse, help="Model dtype (fp32 / bf16 / fp16 are aliases). Default: the model's.", rich_help_panel="Setup")]
Device = Annotated[c.Device, typer.Option("--device", parser=c.Device.parse, help="auto picks CUDA when present; cuda:N picks one GPU.", rich_help_panel="Setup")]
Trainable = Annotated[Optional[str], typer.Option("--trainable", help="Regex naming the parameters you intend to train.", rich_help_panel="Setup")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow custom code: model code from the directory or hub, and a factory that an adapter config or run metadata names as the base.", rich_help_panel="Setup")]

Data = Annotated[Optional[str], typer.Option("--data", help="JSONL file: build the probe batch from real samples.", rich_help_panel="Probe")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Probe batch size.", rich_help_panel="Probe")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Probe sequence length.", rich_help_panel="Probe")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for init and synthetic batches.", rich_help_panel="Probe")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Load no weights: judge the setup on a toy-width twin of MODEL's config (a config.json, its directory or a preset); sizes are the full model's. Cannot see non-finite or zero gradients, or data.", rich_help_panel="Probe")]

_CI = "CI"
FailOn = Annotated[Optional[c.FailOn], typer.Option("--fail-on", parser=c.FailOn.parse, show_default=False, help="Exit 1 on findings at or above this severity. Default: \\[tool.gradflow] fail-on, else error.", rich_help_panel=_CI)]
Format = Annotated[c.Format, typer.Option("--format", parser=c.Format.parse, help="Report on stdout.")]
ProbeFormat = Annotated[c.ProbeFormat, typer.Option("--format", parser=c.ProbeFormat.parse, help="Report on stdout (SARIF for code scanning).")]
Select = Annotated[Optional[List[str]], typer.Option("--select", metavar="CODES", show_default=False, help="Only these findings: comma-separated codes, code prefixes (GF1), slugs or ALL. Overrides \\[tool.gradflow] select.", rich_help_panel=_CI)]
Ignore = Annotated[Optional[List[str]], typer.Option("--ignore", metavar="CODES", show_default=False, help="Drop these findings (codes, prefixes, slugs), after \\[tool.gradflow] select/ignore.", rich_help_panel=_CI)]
Baseline = Annotated[Optional[str], typer.Option("--baseline", metavar="FILE", show_default=False, help="Expected trainable set and findings (JSON). Missing: written, exit by --fail-on. Present: exit 1 only for a new finding at or above --fail-on, or a changed trainable set; fixed ones are listed.", rich_help_panel=_CI)]
UpdateBaseline = Annotated[bool, typer.Option("--update-baseline", help="Write --baseline FILE anew even when it exists (accept the changes).", rich_help_panel=_CI)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Data only: no progress or hints on stderr (errors still print).", rich_help_panel=_CI)]
# report JSON size: per-parameter rows and every module row only when asked (gradflow.report.render.json_report)
Detail = Annotated[_Detail, typer.Option("--detail", parser=_Detail.parse, help="JSON detail: compact (counts, findings, per-layer gradients, module rows down to each layer) or params (also every module and every trainable parameter).")]
Isolated = Annotated[bool, typer.Option("--isolated", help="Ignore \\[tool.gradflow] in pyproject.toml.", rich_help_panel=_CI)]


@dataclasses.dataclass
class SetupArgs:
    """How to build the setup (every command): the options of gradflow.setup.build.SetupOptions."""

    lora_r: LoraR = None
    lora_alpha: LoraAlpha = None
    lora_targets: LoraTargets = None
    adapter: Adapter = None
    adapter_trainable: AdapterTrainable = False
    quant: Quant = "none"
    gc: GC = None
    dtype: DType = None
    device: Device = "auto"
    trainable: Trainable = None
    trust_remote_code: TrustRemoteCode = False

    def options(self, *, seed: int = 0, trainable: str | None = None, **more):
        """SetupOptions, validated; `trainable` as [tool.gradflow] and the flag resolved it (see Gate); `more`:
        the options of one command (train's so8_layers)."""
        from gradflow.setup.options import SetupOptions

        plain = {f.name: c.plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # the library: plain str
        return SetupOptions(**{**plain, "trainable": trainable if trainable is not None else self.trainable},
                            seed=seed, **more)


@dataclasses.dataclass
class ProbeArgs:
    """The probe batch (inspect, probe-backward, patch)."""

    data: Data = None
    batch_size: BatchSize = 2
    seq_len: SeqLen = 32
    seed: Seed = 0


@dataclasses.dataclass
class CIArgs:
    """The CI side (inspect, probe-backward, patch): exit code, rule selection, baseline, quiet, config."""

    fail_on: FailOn = None
    select: Select = None
    ignore: Ignore = None
    baseline: Baseline = None
    update_baseline: UpdateBaseline = False
    quiet: Quiet = False
    isolated: Isolated = False


GROUPS = (SetupArgs, ProbeArgs, CIArgs)


def wrapper(ddp: bool, fsdp: bool, *, update_baseline: bool = False) -> str | None:
    """--ddp / --fsdp as the library's `wrapper` ("ddp", "fsdp" or None)."""
    from gradflow.errors import GradflowError

    if ddp and fsdp:
        raise GradflowError("--ddp and --fsdp are two ways to wrap one model", "Pass one of them")
    flag = "--ddp" if ddp else "--fsdp" if fsdp else None
    if flag and update_baseline:
        raise GradflowError(f"{flag} cannot be combined with --update-baseline yet",
                            f"Drop --update-baseline, or probe in one process without {flag}")
    return flag[2:] if flag else None


def command(fn):
    """Expand each parameter annotated with a group (SetupArgs, ProbeArgs, CIArgs) into the group's options, so
    that Typer sees every flag, and hand the command one object per group: each shared option is defined once."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params, groups = [], {}
    for p in inspect.signature(fn).parameters.values():
        group = hints.get(p.name)
        if group not in GROUPS:
            params.append(p.replace(annotation=hints.get(p.name, p.annotation)))
            continue
        fields = typing.get_type_hints(group, include_extras=True)
        groups[p.name] = group
        params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                     annotation=fields[f.name]) for f in dataclasses.fields(group)]

    @functools.wraps(fn)
    def run(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        return fn(**kwargs)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    del run.__wrapped__  # Typer must read the expanded signature, not the command's own
    return run


