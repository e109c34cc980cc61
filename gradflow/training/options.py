"""`gradflow train`'s options: what the CLI takes, checked before any work."""

from __future__ import annotations

import dataclasses

from gradflow.choices import Attn, CE, Compile, LossOn, Precision
from gradflow.errors import GradflowError
from gradflow.limits import check_float, check_int


PRECISIONS = Precision.values()
LOSS_ON = LossOn.values()
ATTN_MODES = Attn.values()
CE_MODES = CE.values()
COMPILE_MODES = Compile.values()


@dataclasses.dataclass
class TrainOptions:
    """Training options as the CLI takes them. None means: the memory plan chooses."""

    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4  # samples per step without packing; with packing it sizes the default token budget
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 0
    precision: str = "fp32"  # mixed precision: fp32 (off) | bf16 | fp16
    loss_on: str = "completion"
    strict: bool = False
    think_lenient: bool = False  # /think tags written with look-alikes: trained as normalised, not refused
    recipe: str | None = None
    resume: bool = False
    resume_anyway: bool = False  # resume although the run's fingerprint differs (implies resume)
    overwrite: bool = False
    merge: bool = False
    unsafe_fixes: bool = False
    check_every: int = 10
    moved_at_step: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10
    warmup_steps: int = 0
    previews: int = 2
    packing: bool = True  # padding-free packing into token-budget batches; False: dynamic padding
    tokens_per_batch: int | None = None  # None: the plan's choice
    gc_every: int | None = None  # checkpoint every n-th decoder layer (1: all); None: the plan's choice
    max_memory: str | None = None  # "24GiB", "500MiB": the plan's budget instead of the device's free memory
    attn: str = "auto"
    ce: str = "auto"
    compile: str = "auto"  # torch.compile each decoder layer (gradflow.training.compiling)
    fsdp: bool = False  # FSDP2 through accelerate, under torchrun (gradflow.training.fsdp)
    cache: bool = True  # tokenised data and compiled kernels kept across runs (gradflow.data.cache)

    def validate(self) -> None:
        # finite and bounded, each bound in the message (gradflow.limits holds the table)
        bounded = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--seq-len": self.seq_len,
                   "--check-every": self.check_every, "--save-steps": self.save_steps,
                   "--logging-steps": self.logging_steps, "--seed": self.seed}
        for flag, value in bounded.items():
            check_int(flag, value)
        for flag, value in (("--max-steps", self.max_steps), ("--moved-at", self.moved_at_step),
                            ("--tokens-per-batch", self.tokens_per_batch), ("--gc-every", self.gc_every)):
            if value is not None:  # None: no step limit / no moved-weights check / the plan's choice
                check_int(flag, value)
        check_float("--epochs", self.epochs)  # checked even beside --max-steps: inf is a typo either way
        check_float("--lr", self.learning_rate)
        # the same parser as the CLI's: one message for a bad value from a flag or the API; stored as plain str
        self.precision = Precision.parse(self.precision, "--precision").value
        self.loss_on = LossOn.parse(self.loss_on, "--loss-on").value
        self.attn = Attn.parse(self.attn, "--attn").value
        self.ce = CE.parse(self.ce, "--ce").value
        self.compile = Compile.parse(self.compile, "--compile").value
        if self.resume and self.overwrite:
            raise GradflowError("--resume and --overwrite contradict each other", "Pass one of them")
        if self.tokens_per_batch is not None and not self.packing:
            raise GradflowError("--tokens-per-batch sizes packed batches, and --no-packing turns packing off",
                                "Drop one of them (without packing, --batch-size sets the batch)")
        if self.tokens_per_batch is not None and self.tokens_per_batch < self.seq_len:
            raise GradflowError(f"--tokens-per-batch {self.tokens_per_batch} is less than --seq-len {self.seq_len}: "
                                "the longest sample would not fit a batch",
                                f"Pass --tokens-per-batch {self.seq_len} or more, or a smaller --seq-len")
        if self.max_memory is not None and parse_bytes(self.max_memory) < MIN_MEMORY:
            raise GradflowError(f"--max-memory {self.max_memory} is less than 64 MiB, too little for any model",
                                "Pass 64MiB or more (the budget for the whole run: weights, optimizer, activations)")


MIN_MEMORY = 64 << 20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """'24GiB', '500MiB', '1.5GB', '123456' → bytes; GradflowError when it is not a size."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise GradflowError(f"--max-memory {text!r} is not a memory size", "Write it like 24GiB, 500MiB or 8GB")
    return int(float(match.group(1)) * _UNITS[unit])
