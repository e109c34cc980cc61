"""The startup profile: how long each stage of `gradflow train` took before the first optimizer step.

Stages, in the order the run takes them (report.json `train.startup`, seconds):
- imports: process start → train() called (Python, torch, transformers, the CLI); only when the caller says when
  its process started (the CLI does), else null;
- data: the JSONL read, validated and encoded (tokenised data may come from the cache: `cache.data`);
- model: the model built or loaded, with its LoRA; `quantization` is the share of it spent quantizing (bitsandbytes
  quantizes while loading: the time inside its `_quantize`);
- plan: the memory plan's measuring passes; preflight: probe → patch → probe;
- compile: dynamo/inductor compiling the decoder layers. torch.compile is lazy, so this is measured inside the first
  step (torch._dynamo's own `_compile.compile_inner` clock), and `first_step` is that step without it;
- trainer: TrainingArguments, Trainer, callbacks; first_step: Trainer.train() called → the first optimizer step
  ended (accelerate's prepare, the dataloader, one step), less the compiling;
- time_to_first_step: train() called (or the process start, when known) → the first optimizer step ended.
"""

from __future__ import annotations

import contextlib
import os
import time

STAGES = ("imports", "data", "model", "quantization", "plan", "preflight", "compile", "trainer", "first_step")


def process_started() -> float | None:
    """time.time() when this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks after boot
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age if age >= 0 else None


class Startup:
    """Seconds per stage (STAGES), the compile statistics and the caches' outcome, for report.json."""

    def __init__(self, started: float | None = None):
        self.entered = time.time()  # train() called
        self.origin = started if started is not None and started <= self.entered else self.entered
        self.seconds: dict[str, float | None] = {name: None for name in STAGES}
        if started is not None:
            self.seconds["imports"] = max(0.0, self.entered - self.origin)
        self.first_step_at: float | None = None
        self.cache: dict = {"data": None, "compile_dir": None}
        self.compile: dict = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def training_starts(self) -> None:
        """Trainer.train() is called: the first step's clock, and the compile clock, start here."""
        self.train_called = time.perf_counter()
        self.compile_before = compile_clock()

    def first_step_ended(self) -> None:
        if self.first_step_at is not None or getattr(self, "train_called", None) is None:
            return
        self.first_step_at = time.time()
        self.compile = compile_delta(self.compile_before, compile_clock())
        compiling = self.compile["seconds"]
        if compiling:
            self.add("compile", compiling)
        self.add("first_step", max(0.0, time.perf_counter() - self.train_called - compiling))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = (self.seconds[name] or 0.0) + seconds

    def to_dict(self) -> dict:
        out = {f"{name}_s": None if value is None else round(value, 3) for name, value in self.seconds.items()}
        out["time_to_first_step_s"] = None if self.first_step_at is None else round(self.first_step_at - self.origin,
                                                                                     3)
        out["from"] = "process start" if self.seconds["imports"] is not None else "train() called"
        out["cache"] = dict(self.cache)
        out["compile"] = dict(self.compile)
        return out


def startup_line(startup: dict) -> str:
    """One line for --verbose, from report.json's `train.startup`: the time to the first step, then each stage."""
    seconds = {name: startup.get(f"{name}_s") for name in STAGES}
    parts = []
    for name, value in seconds.items():
        if value is None or name == "quantization":
            continue
        quant = seconds["quantization"] if name == "model" else None
        parts.append(f"{name.replace('_', ' ')} {value:.1f}s" + (f" (quantization {quant:.1f}s)" if quant else ""))
    total = startup.get("time_to_first_step_s")
    head = f"startup: first step at {total:.1f}s from {startup.get('from')}" if total is not None else \
        "startup: no step taken"
    data = (startup.get("cache") or {}).get("data") or {}
    graphs = (startup.get("compile") or {}).get("graphs")
    tail = [f"data cache {data['status']}"] if data.get("status") else []
    tail += [f"{graphs} compiled graphs"] if graphs else []
    return f"{head}: {', '.join(parts)}" + (f" ({'; '.join(tail)})" if tail else "")


# ----- what the stages measure from the libraries ----------------------------------------------------------------
def compile_clock() -> dict:
    """torch._dynamo's running totals: seconds compiling frames, graphs, recompiles, graph breaks, inductor/AOT
    cache hits."""
    import sys

    if "torch._dynamo" not in sys.modules:  # nothing compiled yet, and importing dynamo costs seconds
        return {"seconds": 0.0, "graphs": 0, "recompiles": 0, "graph_breaks": 0, "fx_cache_hits": 0, "fx_cache_misses": 0,
                "aot_cache_hits": 0, "aot_cache_misses": 0}
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"seconds": float(sum(compilation_time_metrics.get("_compile.compile_inner", []))),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "recompiles": int(sum(counters["recompiles"].values())),
            # a break inside a checkpointed layer leaves that layer eager (e.g. a side effect under checkpoint)
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "fx_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
            "fx_cache_misses": int(counters["inductor"].get("fxgraph_cache_miss", 0)),
            "aot_cache_hits": int(counters["aot_autograd"].get("autograd_cache_hit", 0)),
            "aot_cache_misses": int(counters["aot_autograd"].get("autograd_cache_miss", 0))}


def compile_delta(before: dict, after: dict) -> dict:
    return {k: (round(after[k] - before[k], 3) if isinstance(after[k], float) else after[k] - before[k])
            for k in after}


@contextlib.contextmanager
def timing_quantization(startup: Startup, quant: str):
    """Add the time spent inside bitsandbytes' weight quantization (Params4bit / Int8Params `_quantize`, which
    from_pretrained calls while loading) to the `quantization` stage. --quant none, or no bitsandbytes: nothing."""
    import importlib.util

    if quant == "none" or importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    try:
        from bitsandbytes.nn import Int8Params, Params4bit
    except Exception:  # a bitsandbytes that fails to import: the load names it, if it is needed
        yield
        return
    originals = [(cls, cls.__dict__["_quantize"]) for cls in (Params4bit, Int8Params) if "_quantize" in cls.__dict__]

    def timed(original):
        def _quantize(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                startup.add("quantization", time.perf_counter() - t0)
        return _quantize

    for cls, original in originals:
        cls._quantize = timed(original)
    try:
        yield
    finally:
        for cls, original in originals:
            cls._quantize = original


def first_step_callback(startup: Startup):
    """A TrainerCallback that tells `startup` when the first optimizer step ended."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            startup.first_step_ended()

    return FirstStep()


def release_memory(device: str) -> None:
    """After the plan's and the pre-flight's passes: collect the graphs they left in reference cycles and give the
    allocator's cached blocks back, so that training starts from the weights alone (the blocks cut to the probes'
    shapes would otherwise stay reserved beside training's, and count in the process's peak). CUDA only: a full
    collection costs ~0.5 s in a process holding torch and transformers, and on the CPU nothing is cached."""
    if device != "cuda":
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
