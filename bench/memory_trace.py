"""Where a training step's peak GPU memory goes: the CUDA caching allocator's trace of one step, read at its peak.

`start()` turns on `torch.cuda.memory._record_memory_history` (Python stacks; set MEMORY_TRACE_STACKS=all for C++
frames too, which name the autograd node of backward allocations) before a step; `stop(path)`
after it takes the snapshot, turns recording off and writes `summary(...)` to `path`. The summary replays the
step's allocations and frees (`alloc` / `free_completed`, the events `torch.cuda.memory_allocated` counts), finds
the moment of the peak, and lists what was allocated during the step and still alive then, grouped by where it was
allocated: the innermost Python frame outside torch (the model, PEFT, bitsandbytes, gradflow, the Trainer) and the
innermost autograd node or aten op of the C++ stack (backward allocations have no Python frame of their own).
Memory held since before the step (weights, optimizer moments, checkpointed layer inputs kept between steps) is the
baseline, `torch.cuda.memory_allocated()` when recording starts.

Used by bench/train_compare.py --memory-trace RUNS.
"""

from __future__ import annotations

import collections
import os

MiB = 2**20


def start() -> int:
    """Start recording; returns the baseline (bytes allocated now)."""
    import torch

    torch.cuda.synchronize()
    # with C++ stacks, gradflow's chunked cross-entropy failed once on an H200 inside the traced step
    # ("cross_entropy_loss returned NULL without setting an exception"); d's run traced fine
    torch.cuda.memory._record_memory_history(max_entries=2_000_000,
                                             stacks=os.environ.get("MEMORY_TRACE_STACKS", "python"))
    return torch.cuda.memory_allocated()


def stop(path: str, baseline: int, title: str) -> dict:
    """Snapshot, stop recording, write the summary to `path`; returns its figures."""
    import torch

    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    traces = snap.get("device_traces") or []
    text, figures = summary(traces[device] if device < len(traces) else [], baseline, title)
    with open(path, "w") as fh:
        fh.write(text)
    return figures


def _where(frames: list) -> str:
    py = next((f for f in frames if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"]), None)
    native = next((f["name"] for f in frames if "Backward" in f.get("name", "")), None) or next(
        (f["name"] for f in frames if f.get("name", "").startswith(("at::native::", "at::_ops::"))), None)
    here = f"{py['filename'].split('site-packages/')[-1]}:{py['line']} {py['name']}" if py else "(no Python frame)"
    if native:
        native = native.split("(")[0].replace("torch::autograd::generated::", "")
        here += f"  [{native}]"
    return here


def summary(trace: list, baseline: int, title: str, top: int = 25) -> tuple[str, dict]:
    """The step's peak and what was alive at it, from an allocator trace."""
    current = peak = 0
    peak_at = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            current += event["size"]
            if current > peak:
                peak, peak_at = current, i
        elif event["action"] == "free_completed":
            current -= event["size"]
    live: dict = {}
    freed_before = 0  # baseline blocks freed before the peak (gradients set to None, a kept batch released)
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            if live.pop(event["addr"], None) is None:
                freed_before += event["size"]
    groups: dict = collections.defaultdict(lambda: [0, 0])
    for event in live.values():
        g = groups[_where(event.get("frames") or [])]
        g[0] += event["size"]
        g[1] += 1
    alive = sum(e["size"] for e in live.values())
    lines = [f"# {title}",
             f"baseline (allocated when the step began): {baseline / MiB:,.1f} MiB",
             f"step peak: {(baseline + peak) / MiB:,.1f} MiB = baseline - {freed_before / MiB:,.1f} MiB of it freed "
             f"before the peak + {alive / MiB:,.1f} MiB allocated in the step and alive at the peak "
             f"(event {peak_at + 1} of {len(trace)})",
             "", f"alive at the peak, allocated during the step, by where (top {top}):",
             f"{'MiB':>10} {'blocks':>7}  where"]
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / MiB:>10,.1f} {count:>7}  {where}")
    figures = {"baseline": baseline, "step_peak": baseline + peak, "alive_at_peak": alive,
               "baseline_freed_before_peak": freed_before, "events": len(trace)}
    return "\n".join(lines) + "\n", figures
