"""The memory plan: before training, choose the fastest configuration that fits the memory there is.

The choices are gradient checkpointing (off, every n-th decoder layer, or all) and the tokens per step. Less
checkpointing is faster (no recomputed forward); the tokens per step keep their target (--batch-size x --seq-len,
or --tokens-per-batch) so that the run learns the same whatever the device, and shrink only when even full
checkpointing does not fit.

How the peak is known, per token:
- CUDA: measured. One forward+backward at two small token counts, with checkpointing on every layer and off;
  `torch.cuda.max_memory_allocated` above what was allocated before gives a line (fixed + per token) for each,
  and every n-th layer lies between them in proportion to the layers checkpointed. These probe steps count in the
  run's peak, so none may need more than the step the plan will choose: without checkpointing they take 1/32 of
  the target tokens, and when the checkpointing is given (--gc-every, --gc, the model's own) only it is measured.
  Checkpointing off is measured first, and when it fits at the target tokens (the plan then chooses it) the
  every-layer line is not measured: 3 passes instead of 5. The passes compute the loss training will (--ce).
- CPU: there is no allocator peak to read, so the forward's saved activations are counted instead
  (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters excluded) at two token counts, inside
  and outside the decoder layers. A checkpointed layer keeps only its input (tokens x hidden) and recomputes one
  layer at a time in backward; the backward's transient is taken as twice the largest saved tensor (the logits).
Static memory: the weights (and buffers), the trainable parameters' gradients and AdamW's two moments.
The budget: --max-memory, else the free device memory (`torch.cuda.mem_get_info` plus what this process holds)
or the available RAM plus the weights already loaded; 90% of it is planned for, the rest is headroom.
"""

from __future__ import annotations

import dataclasses
import math
import os

from gradflow.errors import GradflowError
from gradflow.forward import model_device
from gradflow.models import decoder_layers, gc_mode_of
from gradflow.training.memory import Estimate, measure, set_layer_checkpointing
from gradflow.training.options import parse_bytes

HEADROOM = 0.9  # plan for 90% of the budget: allocator fragmentation and kernels' workspaces take the rest


@dataclasses.dataclass
class Plan:
    """What the plan chose, from what, and why."""

    device: str
    budget: int | None  # bytes planned against (after headroom); None: unknown
    budget_from: str
    tokens_per_batch: int
    tokens_from: str  # "plan" | "--tokens-per-batch" | "--batch-size x --seq-len" | "checkpoint"
    gc_every: int  # 0: off, 1: every layer, n: every n-th layer
    checkpointed: int  # decoder layers checkpointed
    layers: int
    gc_from: str  # "plan" | "--gc" | "--gc-every" | "the model"
    expected_peak: int | None
    estimate: Estimate | None
    why: str
    packing: bool = True
    candidates: list[dict] = dataclasses.field(default_factory=list)

    @property
    def gc_text(self) -> str:
        if self.gc_every == 0:
            return "off"
        if self.gc_every == 1:
            return f"every layer ({self.checkpointed})" if self.layers else "on"
        return f"every {ordinal(self.gc_every)} layer ({self.checkpointed} of {self.layers})"

    def lines(self) -> list[str]:
        peak = f"{gib(self.expected_peak)} expected peak" if self.expected_peak is not None else "peak not estimated"
        budget = f"of {gib(self.budget)} ({self.budget_from})" if self.budget is not None else f"({self.budget_from})"
        unit = "tokens per batch" if self.packing else "tokens per batch at most (padded batches)"
        return [f"plan: checkpointing {self.gc_text} [{self.gc_from}], {self.tokens_per_batch} {unit} "
                f"[{self.tokens_from}]: {peak} {budget}", f"plan: {self.why}"]

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "estimate"}
        out["gc"] = self.gc_text
        out["estimate"] = dataclasses.asdict(self.estimate) if self.estimate is not None else None
        return out


def ordinal(n: int) -> str:
    return f"{n}{'tsnrhtdd'[(n // 10 % 10 != 1) * (n % 10 < 4) * n % 10::4]}"


def gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def checkpointed_for(layers: int, every: int) -> int:
    return 0 if every == 0 else math.ceil(layers / every)


def budget(device: str, max_memory: str | None, model) -> tuple[int | None, str]:
    """Bytes to plan for (after headroom) and where the number comes from."""
    if max_memory is not None:
        return int(parse_bytes(max_memory) * HEADROOM), f"--max-memory {max_memory}"
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        held = torch.cuda.memory_reserved()
        return int((free + held) * HEADROOM), "free GPU memory"
    available = _available_ram()
    if available is None:
        return None, "available RAM unknown"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int((available + weights) * HEADROOM), "available RAM"


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ----- choosing -----------------------------------------------------------------------------------------------
def choose(estimate: Estimate | None, budget_bytes: int | None, *, target: int, minimum: int,
           gc_fixed: int | None, tokens_fixed: bool, layers: int) -> tuple[int, int, str, list[dict]]:
    """(gc_every, tokens, why, candidates): the least checkpointing that fits at the target tokens; else full
    checkpointing at the most tokens that fit (never below `minimum`, the longest sample)."""
    options = [gc_fixed] if gc_fixed is not None else _gc_options(layers)
    if estimate is None or budget_bytes is None:
        every = options[0]
        return every, target, "no estimate: " + ("the budget is unknown" if estimate is not None else
                                                "the peak could not be measured"), []
    candidates = []
    for every in options:
        peak = estimate.peak(target, checkpointed_for(layers, every))
        candidates.append({"gc_every": every, "tokens": target, "peak": peak, "fits": peak <= budget_bytes})
        if peak <= budget_bytes:
            return every, target, _fits_why(every, options, gc_fixed, estimate, target, layers, budget_bytes), \
                candidates
    every = options[-1]
    if tokens_fixed:
        return every, target, f"{gib(candidates[-1]['peak'])} at {target} tokens exceeds the budget even so: " \
                              "expect out-of-memory; lower --tokens-per-batch or --seq-len", candidates
    k = checkpointed_for(layers, every)
    slope = max(estimate.peak(target, k) - estimate.peak(0, k), 1) / target
    tokens = int((budget_bytes - estimate.peak(0, k)) / slope)
    if tokens < minimum:
        return every, minimum, f"even {minimum} tokens (the longest sample) with the most checkpointing exceed the " \
                               "budget: expect out-of-memory; lower --seq-len or use --quant 4bit", candidates
    return every, tokens, f"{target} tokens do not fit with any checkpointing: {tokens} tokens per batch do", candidates


def _gc_options(layers: int) -> list[int]:
    """Checkpointing from fastest (off) to most memory-saving (every layer), one option per distinct count."""
    if layers == 0:
        return [0]
    out, counts = [0], {0}
    for every in range(layers, 0, -1):
        k = checkpointed_for(layers, every)
        if k not in counts:
            counts.add(k)
            out.append(every)
    return out


def _fits_why(every, options, gc_fixed, estimate, target, layers, budget_bytes) -> str:
    if gc_fixed is not None:
        return "checkpointing as asked, and it fits"
    if every == 0:
        return "checkpointing off (the fastest) fits"
    faster = options[options.index(every) - 1]
    return (f"checkpointing {'off' if faster == 0 else f'every {ordinal(faster)} layer'} would need "
            f"{gib(estimate.peak(target, checkpointed_for(layers, faster)))}: more than the budget")


def make_plan(setup, opts, *, gc_from: str, resumed_tokens: int | None = None, ce: str = "standard") -> Plan:
    """Measure, choose, apply (per-layer checkpointing), and return the plan. `gc_from`: "plan" when gradflow built
    the checkpointing and may change it, "--gc" when the user set it, "the model" when the model's source did.
    `ce`: the cross-entropy training will use (the measured steps use it too)."""
    model = setup.model
    device = model_device(model).type
    layers = decoder_layers(model, checkpointable=True)  # those transformers checkpoints one by one
    toggles = bool(layers) and all(getattr(layer, "_gradient_checkpointing_func", None) is not None
                                   for layer in layers)
    on_now = sum(gc_mode_of(layer) != "off" for layer in layers)
    gc_fixed = None
    if opts.gc_every is not None:
        gc_fixed, gc_from = opts.gc_every, "--gc-every"
    elif gc_from != "plan" or not toggles:
        gc_fixed, gc_from = (1 if on_now else 0), ("the model" if gc_from == "plan" else gc_from)
    if opts.gc_every is not None and not toggles:
        raise GradflowError(f"--gc-every {opts.gc_every}: this model has no per-layer checkpointing switched on",
                            "Drop --gc-every, or pass --gc non-reentrant with it (a transformers model)")
    if resumed_tokens is not None and opts.tokens_per_batch is None:
        target, tokens_from, tokens_fixed = resumed_tokens, "checkpoint", True
    elif opts.tokens_per_batch is not None:
        target, tokens_from, tokens_fixed = opts.tokens_per_batch, "--tokens-per-batch", True
    else:
        target, tokens_from, tokens_fixed = opts.batch_size * opts.seq_len, "--batch-size x --seq-len", False
    if not opts.packing:
        tokens_fixed = True  # padded batches: --batch-size rows, the plan only chooses checkpointing
    estimate, problem = None, None
    budget_bytes, budget_from = budget(device, opts.max_memory, model)  # first: the measuring stops once it knows
    if getattr(setup, "loss_fn", None) is None and getattr(getattr(model, "config", None), "vocab_size", None):
        try:
            estimate = measure(model, target=target, precision=opts.precision, layers=layers,
                               can_toggle=toggles, fixed=gc_fixed, ce=ce, budget=budget_bytes)
        except Exception as exc:  # a broken setup: the pre-flight names why; the plan falls back to the defaults
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    every, tokens, why, candidates = choose(estimate, budget_bytes, target=target, minimum=opts.seq_len,
                                            gc_fixed=gc_fixed, tokens_fixed=tokens_fixed, layers=len(layers))
    if problem is not None:
        why = f"the measuring step failed ({problem}): checkpointing and tokens left at their defaults"
    if tokens != target:
        tokens_from = "plan"
    checkpointed = checkpointed_for(len(layers), every)
    if toggles:
        set_layer_checkpointing(layers, every)
    elif every and not on_now:
        checkpointed = 0
    peak = estimate.peak(tokens, checkpointed) if estimate is not None else None
    return Plan(device=device, budget=budget_bytes, budget_from=budget_from, tokens_per_batch=tokens,
                tokens_from=tokens_from, gc_every=every, checkpointed=checkpointed, layers=len(layers),
                gc_from=gc_from, expected_peak=peak, estimate=estimate, why=why, packing=opts.packing,
                candidates=candidates)
