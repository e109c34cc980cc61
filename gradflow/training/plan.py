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
from gradflow.models import gc_mode_of
from gradflow.setup.build import hidden_size
from gradflow.training.options import parse_bytes

HEADROOM = 0.9  # plan for 90% of the budget: allocator fragmentation and kernels' workspaces take the rest


@dataclasses.dataclass
class Estimate:
    """Peak bytes of a training step as a function of tokens and checkpointed layers."""

    how: str  # "cuda peak" | "saved activations"
    layers: int  # decoder layers that can be checkpointed one by one (0: checkpointing is not the plan's)
    static: int  # weights, gradients and optimizer moments
    fixed_off: float  # per-step bytes that do not grow with tokens, checkpointing off
    per_token_off: float
    fixed_all: float
    per_token_all: float

    def peak(self, tokens: int, checkpointed: int) -> int:
        share = (self.layers - checkpointed) / self.layers if self.layers else 1.0
        fixed = self.fixed_all + (self.fixed_off - self.fixed_all) * share
        per_token = self.per_token_all + (self.per_token_off - self.per_token_all) * share
        return int(self.static + max(fixed, 0.0) + per_token * tokens)


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


# ----- the layers ---------------------------------------------------------------------------------------------
def checkpoint_layers(model) -> list:
    """The decoder layers transformers checkpoints one by one (GradientCheckpointingLayer, both stacks)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_layer_checkpointing(layers: list, every: int) -> int:
    """Checkpoint layers 0, n, 2n, … (every=n; 0: none). The per-layer `gradient_checkpointing` attribute is what
    GradientCheckpointingLayer reads on each call in 4.57 and 5.x. Returns how many are checkpointed."""
    count = 0
    for i, layer in enumerate(layers):
        on = every > 0 and i % every == 0
        layer.gradient_checkpointing = on
        count += on
    return count


def checkpointed_for(layers: int, every: int) -> int:
    return 0 if every == 0 else math.ceil(layers / every)


# ----- measuring ----------------------------------------------------------------------------------------------
def _batch(model, tokens: int, device):
    import torch

    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    ids = torch.randint(3, max(4, vocab), (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens, device=device)[None]}


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision in ("bf16", "fp16"):
        return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _static_bytes(model) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable  # gradients + AdamW's exp_avg and exp_avg_sq, in the parameters' dtype


def _optimizer_bytes(model) -> int:
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _cuda_peak(model, tokens: int, device, precision: str) -> int:
    """Peak bytes one forward+backward adds on CUDA (gradients included)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with _autocast("cuda", precision):
        loss = model(**_batch(model, tokens, device)).loss
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del loss
    for p in model.parameters():
        p.grad = None
    return peak


def _saved_bytes(model, tokens: int, device, precision: str, layers: list) -> tuple[int, int, int]:
    """(bytes saved for backward inside decoder layers, outside them, the largest saved tensor) for one forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    inside = [0]
    totals = {"in": 0, "out": 0, "max": 0}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in seen and key != 0:
                seen.add(key)
                size = storage.nbytes()
                totals["in" if inside[0] else "out"] += size
                totals["max"] = max(totals["max"], size)
        return t.detach()  # not t itself: a saved output returned as is holds its own grad_fn, a cycle gc cannot free

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)))
        handles.append(layer.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device.type, precision):
            out = model(**_batch(model, tokens, device))
        del out
    finally:
        for h in handles:
            h.remove()
    return totals["in"], totals["out"], totals["max"]


def _line(p1: float, p2: float, t1: int, t2: int) -> tuple[float, float]:
    slope = max(0.0, (p2 - p1) / (t2 - t1))
    return p1 - slope * t1, slope


def measure(model, *, target: int, precision: str, layers: list, can_toggle: bool,
            fixed: int | None = None) -> Estimate:
    """Two small steps (or forwards) per configuration; see the module docstring. `fixed`: the checkpointing is
    not the plan's to choose (0 off, n every n-th layer): on CUDA only that configuration is measured."""
    import torch


    device = model_device(model)
    t1 = max(8, min(512 if device.type == "cuda" else 128, target // 4))  # small, yet above CUDA's fixed noise
    t2 = 2 * t1
    was_training = model.training
    states = [layer.gradient_checkpointing for layer in layers]
    model.train()
    try:
        if device.type == "cuda":
            def line(tokens: int) -> tuple[float, float]:
                return _line(_cuda_peak(model, tokens, device, precision),
                             _cuda_peak(model, 2 * tokens, device, precision), tokens, 2 * tokens)

            # the probe steps count in the run's peak (module docstring): only the given checkpointing, or
            # without checkpointing at 1/32 of the target tokens
            _cuda_peak(model, 8, device, precision)  # first-use allocations (cuBLAS workspaces) out of the lines
            if fixed is not None or not can_toggle:
                if can_toggle:
                    set_layer_checkpointing(layers, fixed)
                fixed_at, slope_at = line(t1)
                static = torch.cuda.memory_allocated(device) + _optimizer_bytes(model)
                return Estimate("cuda peak", 0, static, fixed_at, slope_at, fixed_at, slope_at)
            set_layer_checkpointing(layers, 1)
            fixed_all, slope_all = line(t1)
            set_layer_checkpointing(layers, 0)
            fixed_off, slope_off = line(max(8, min(t1, target // 32)))
            static = torch.cuda.memory_allocated(device) + _optimizer_bytes(model)
            return Estimate("cuda peak", len(layers), static, fixed_off, slope_off, fixed_all, slope_all)
        if can_toggle:
            set_layer_checkpointing(layers, 0)
        with torch.enable_grad():
            a = _saved_bytes(model, t1, device, precision, layers)
            b = _saved_bytes(model, t2, device, precision, layers)
        fixed_in, slope_in = _line(a[0], b[0], t1, t2)
        fixed_out, slope_out = _line(a[1], b[1], t1, t2)
        transient = 2 * b[2] / t2  # the largest saved tensor (the logits) and its gradient, per token
        n = len(layers)
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        width = embed.weight.element_size() if embed is not None and hasattr(embed, "weight") else 4
        kept = (hidden_size(model) or 0) * width  # per token, the input a checkpointed layer keeps
        per_token_off = slope_in + slope_out + transient
        per_token_all = slope_out + transient + (n * kept + slope_in / n if n else slope_in)
        return Estimate("saved activations", n if can_toggle else 0, _static_bytes(model), fixed_in + fixed_out,
                        per_token_off, fixed_out + (fixed_in / n if n else fixed_in), per_token_all)
    finally:
        for layer, state in zip(layers, states):
            layer.gradient_checkpointing = state
        model.train(was_training)
        for p in model.parameters():
            p.grad = None


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


def make_plan(setup, opts, *, gc_from: str, resumed_tokens: int | None = None) -> Plan:
    """Measure, choose, apply (per-layer checkpointing), and return the plan. `gc_from`: "plan" when gradflow built
    the checkpointing and may change it, "--gc" when the user set it, "the model" when the model's source did."""
    model = setup.model
    device = model_device(model).type
    layers = checkpoint_layers(model)
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
    if getattr(setup, "loss_fn", None) is None and getattr(getattr(model, "config", None), "vocab_size", None):
        try:
            estimate = measure(model, target=target, precision=opts.precision, layers=layers,
                               can_toggle=toggles, fixed=gc_fixed)
        except Exception as exc:  # a broken setup: the pre-flight names why; the plan falls back to the defaults
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    budget_bytes, budget_from = budget(device, opts.max_memory, model)
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
