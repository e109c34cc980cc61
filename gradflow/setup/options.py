"""How to build a setup, as the CLI's flags and the Python API say it: `SetupOptions`, checked once, when made.
No torch import: a bad flag is refused before torch loads."""

from __future__ import annotations

import dataclasses
import os

from gradflow.choices import DType, Device, GC, Quant, plain
from gradflow.errors import GradflowError
from gradflow.limits import check_int
from gradflow.setup.sources import compile_regex

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEFAULT_LORA_R = 8  # the rank gradflow gives a preset, directory or hub id when --lora-r is not given
GC_MODES = GC.values()  # the values are defined once, in gradflow.choices
QUANT_MODES = Quant.values()


@dataclasses.dataclass
class SetupOptions:
    """Setup options as the CLI takes them, checked once, when built. None means: leave the model as its source
    built it."""

    lora_r: int | None = None  # None: 8 for presets/dirs/hub ids, no LoRA for factories; 0: no LoRA
    lora_alpha: int | None = None
    lora_targets: str | None = None  # "all-linear" or "a,b,c"
    adapter: str | None = None
    adapter_trainable: bool = False
    quant: str = "none"
    gc: str | None = None
    dtype: str | None = None
    device: str = "auto"
    trainable: str | None = None
    trust_remote_code: bool = False
    seed: int = 0
    so8_layers: list[int] = dataclasses.field(default_factory=list)  # SO(8) rotations beside the LoRA adapter

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # the same check (and message) as the CLI's parsing; an Enum member becomes its plain value
        self.quant = plain(Quant.parse(self.quant))
        self.gc = None if self.gc is None else plain(GC.parse(self.gc))
        self.dtype = None if self.dtype is None else plain(DType.parse(self.dtype))
        self.device = plain(Device.parse(self.device))
        if self.lora_r is not None:
            check_int("--lora-r", self.lora_r)
        if self.lora_alpha is not None:
            check_int("--lora-alpha", self.lora_alpha)
        check_int("--seed", self.seed)
        if self.adapter_trainable and self.adapter is None:
            raise GradflowError("--adapter-trainable has no adapter to apply to", "Pass --adapter DIR with it")
        if self.adapter is not None and (self.lora_r or self.lora_targets):
            raise GradflowError("--adapter loads an existing adapter, so --lora-r / --lora-targets would be ignored",
                                "Drop --lora-r and --lora-targets, or drop --adapter")
        if self.adapter is not None and not os.path.isdir(self.adapter):
            raise GradflowError(f"--adapter {self.adapter}: no such directory",
                                "Pass a directory written by PeftModel.save_pretrained")
        if self.adapter is not None and not os.path.isfile(os.path.join(self.adapter, "adapter_config.json")):
            raise GradflowError(f"--adapter {self.adapter} holds no adapter_config.json",
                                "Pass a directory written by PeftModel.save_pretrained")
        if self.trainable is not None:
            compile_regex(self.trainable)
        if any(type(i) is not int or i < 0 for i in self.so8_layers):
            raise GradflowError(f"--so8-layers {self.so8_layers!r}: layers are indices from 0", "Write it like 2,3")
        self.so8_layers = sorted(set(self.so8_layers))
        if self.so8_layers and (self.adapter is not None or self.lora_r == 0):
            raise GradflowError("--so8-layers rides on a new LoRA adapter, and "
                                + ("--adapter loads one" if self.adapter is not None else "--lora-r is 0"),
                                "Drop --so8-layers, or start from the base model with a positive --lora-r")


def resolved_lora(rank: int | None, alpha: int | None, targets: str | None,
                  default_rank: int = DEFAULT_LORA_R) -> tuple[int, int | None, str | None]:
    """(rank, alpha, targets) as the build applies them: `default_rank` without --lora-r, alpha 2·r, all linear
    layers; alpha and targets None when there is no LoRA (rank 0)."""
    rank = rank if rank is not None else default_rank
    return rank, (alpha or 2 * rank) if rank else None, (targets or "all-linear") if rank else None
