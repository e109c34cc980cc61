"""The values of every choice option, defined once.

The CLI shows these as real choices in `--help` (and completes them), and parses each value through
`Choice.parse`, so a bad value gets the same one line wherever it comes from: a flag, `[tool.gradflow]` in
pyproject.toml, or the Python API. Import-light on purpose: `gradflow --help` loads this module.
"""

from __future__ import annotations

import enum

from gradflow.errors import GradflowError


class Choice(str, enum.Enum):
    """A str Enum whose members compare equal to, hash like and print as their values ("json" == Format.JSON)."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # Enum hashes the member's name: {"json": ...}[Format.JSON] would miss
        return str.__hash__(self)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def flag(cls) -> str:
        return _FLAGS[cls]

    @classmethod
    def invalid(cls, value, where: str | None = None) -> GradflowError:
        """The one message for a value outside the choices; `where` replaces the flag (e.g. a pyproject key)."""
        names = cls.values()
        shown = f"{where or cls.flag()} {value!r}"
        if cls is DType:
            return GradflowError(f"{shown} is not a known dtype", "Use float32, bfloat16 or float16 (or auto)")
        if cls in (FailOn, Device):
            return GradflowError(f"{shown} is not {', '.join(names[:-1])} or {names[-1]}", "Pick one of those")
        return GradflowError(f"{shown} is not one of {', '.join(names)}", "Pick one of those")

    @classmethod
    def parse(cls, value, where: str | None = None):
        """The member for `value` (a member passes through); GradflowError naming the flag otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise cls.invalid(value, where) from None


class Format(Choice):
    """Report formats of inspect, patch and train."""

    TEXT = "text"
    JSON = "json"


class ProbeFormat(Choice):
    """Report formats of probe-backward: SARIF too, for code scanning."""

    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"


class FailOn(Choice):
    """The lowest severity that makes the exit code 1 (info never does)."""

    ERROR = "error"
    WARNING = "warning"
    NEVER = "never"


class GC(Choice):
    """Gradient checkpointing mode."""

    OFF = "off"
    REENTRANT = "reentrant"
    NON_REENTRANT = "non-reentrant"


class Quant(Choice):
    """bitsandbytes quantization of the base model."""

    NONE = "none"
    BIT4 = "4bit"
    BIT8 = "8bit"


class DType(Choice):
    """Model dtype; the short names are aliases (auto: as the model was saved)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Device(Choice):
    """Where the model runs; `cuda:N` picks one GPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, value, where: str | None = None):
        """A member, or the plain string `cuda:N` (N a GPU index)."""
        if isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit():
            return value
        return super().parse(value, where)


class Precision(Choice):
    """train's mixed precision (fp32: off)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class LossOn(Choice):
    """Which tokens train's loss covers."""

    COMPLETION = "completion"
    ALL = "all"


class Attn(Choice):
    """train's attention implementation (auto: flex_attention on CUDA, else sdpa)."""

    AUTO = "auto"
    SDPA = "sdpa"
    FLEX = "flex_attention"
    EAGER = "eager"


class CE(Choice):
    """train's cross-entropy (auto: chunked on CUDA where the model supports it)."""

    AUTO = "auto"
    CHUNKED = "chunked"
    STANDARD = "standard"


class Compile(Choice):
    """train's torch.compile of the decoder layers (auto: on CUDA with Triton, single process)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


_FLAGS = {Format: "--format", ProbeFormat: "--format", FailOn: "--fail-on", GC: "--gc", Quant: "--quant",
          DType: "--dtype", Device: "--device", Precision: "--precision", LossOn: "--loss-on", Attn: "--attn",
          CE: "--ce", Compile: "--compile"}


def plain(value):
    """A member as its plain str value (None and other values unchanged): what the library stores and hashes."""
    return value.value if isinstance(value, Choice) else value
