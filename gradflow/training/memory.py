"""How much memory a training step takes, per token, with checkpointing on every layer and off: measured on CUDA,
counted from the saved activations on CPU (gradflow.training.plan says how, and chooses from it)."""

from __future__ import annotations

import dataclasses

from gradflow.forward import model_device
from gradflow.setup.build import hidden_size
from gradflow.training.loss import chunked_causal_lm_loss


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
    measured: str = "off and every layer"  # which checkpointing was measured (the others are interpolated)

    def peak(self, tokens: int, checkpointed: int) -> int:
        share = (self.layers - checkpointed) / self.layers if self.layers else 1.0
        fixed = self.fixed_all + (self.fixed_off - self.fixed_all) * share
        per_token = self.per_token_all + (self.per_token_off - self.per_token_all) * share
        return int(self.static + max(fixed, 0.0) + per_token * tokens)


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


def _loss(model, batch, ce: str):
    """The step's loss as training computes it: the chunked cross-entropy when `ce` chose it (its logits never
    whole: measuring with the full logits overstated the peak by ~tokens x vocab x 10 bytes), else the model's."""
    loss = chunked_causal_lm_loss(model, batch) if ce == "chunked" else None
    return loss if loss is not None else model(**batch).loss


def _cuda_peak(model, tokens: int, device, precision: str, ce: str = "standard") -> int:
    """Peak bytes one forward+backward adds on CUDA (gradients included)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with _autocast("cuda", precision):
        loss = _loss(model, _batch(model, tokens, device), ce)
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


def _measure_cuda(model, device, *, t1: int, target: int, precision: str, layers: list, can_toggle: bool,
                  fixed: int | None, ce: str, budget: int | None) -> Estimate:
    """The CUDA lines. The probe steps count in the run's peak (module docstring): only the given checkpointing,
    or without checkpointing at 1/32 of the target tokens. Checkpointing off is measured first: when it fits
    `budget` at the target, the plan chooses it whatever the rest, and the every-layer line is not measured."""
    import torch

    def line(tokens: int) -> tuple[float, float]:
        return _line(_cuda_peak(model, tokens, device, precision, ce),
                     _cuda_peak(model, 2 * tokens, device, precision, ce), tokens, 2 * tokens)

    _cuda_peak(model, 8, device, precision, ce)  # first-use allocations (cuBLAS workspaces) out of the lines
    if fixed is not None or not can_toggle:
        if can_toggle:
            set_layer_checkpointing(layers, fixed)
        fixed_at, slope_at = line(t1)
        static = torch.cuda.memory_allocated(device) + _optimizer_bytes(model)
        return Estimate("cuda peak", 0, static, fixed_at, slope_at, fixed_at, slope_at, measured="as given")
    set_layer_checkpointing(layers, 0)
    fixed_off, slope_off = line(max(8, min(t1, target // 32)))
    static = torch.cuda.memory_allocated(device) + _optimizer_bytes(model)
    off = Estimate("cuda peak", len(layers), static, fixed_off, slope_off, fixed_off, slope_off, measured="off")
    if budget is not None and off.peak(target, 0) <= budget:
        return off  # the fastest fits: the every-layer line would change nothing the plan chooses
    set_layer_checkpointing(layers, 1)
    fixed_all, slope_all = line(t1)
    return Estimate("cuda peak", len(layers), static, fixed_off, slope_off, fixed_all, slope_all)


def measure(model, *, target: int, precision: str, layers: list, can_toggle: bool,
            fixed: int | None = None, ce: str = "standard", budget: int | None = None) -> Estimate:
    """Two small steps (or forwards) per configuration; see the module docstring. `fixed`: the checkpointing is
    not the plan's to choose (0 off, n every n-th layer): on CUDA only that configuration is measured. `ce`: the
    loss training uses (standard | chunked); `budget`: the bytes the plan may use (CUDA: see _measure_cuda)."""
    import torch

    device = model_device(model)
    t1 = max(8, min(512 if device.type == "cuda" else 128, target // 4))  # small, yet above CUDA's fixed noise
    t2 = 2 * t1
    was_training = model.training
    states = [layer.gradient_checkpointing for layer in layers]
    model.train()
    try:
        if device.type == "cuda":
            return _measure_cuda(model, device, t1=t1, target=target, precision=precision, layers=layers,
                                 can_toggle=can_toggle, fixed=fixed, ce=ce, budget=budget)
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


# ----- the layers ---------------------------------------------------------------------------------------------
def set_layer_checkpointing(layers: list, every: int) -> int:
    """Checkpoint layers 0, n, 2n, … (every=n; 0: none). The per-layer `gradient_checkpointing` attribute is what
    GradientCheckpointingLayer reads on each call in 4.57 and 5.x. Returns how many are checkpointed."""
    count = 0
    for i, layer in enumerate(layers):
        on = every > 0 and i % every == 0
        layer.gradient_checkpointing = on
        count += on
    return count
