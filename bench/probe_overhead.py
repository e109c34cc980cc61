"""Probe overhead vs a plain forward+backward step (SPEC §9: ≤ 1.10× time, ≤ 1.05× peak memory).

Phi-3.5-mini-shaped model (random init, bf16), LoRA r16 on all linear layers, batch 4 × 2048, one GPU.
Both steps run interleaved in one process so the ratio compares like with like.

    python bench/probe_overhead.py [--layers 32] [--batch 4] [--seq 2048] [--iters 5] [--out bench/results/probe_overhead.md]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main():
    import torch
    from peft import LoraConfig, get_peft_model

    import gradflow
    from gradflow.setup.presets import build_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gc", default="off", choices=["off", "non-reentrant"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev = "cuda"

    import gradflow.setup.presets as presets
    config = presets.preset_config("phi3.5-mini-shape")
    config.num_hidden_layers = args.layers
    config.use_cache = False
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if args.gc != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def plain():
        loss = model(**batch).loss
        loss.backward()
        float(loss)  # the probe reads the loss too
        for p in model.parameters():
            p.grad = None

    def probe():
        gradflow.probe(model, batch)

    def measure(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated()

    for fn in (plain, probe):  # warm-up: kernels, allocator
        measure(fn)
    times = {"plain": [], "probe": []}
    peaks = {"plain": [], "probe": []}
    for _ in range(args.iters):
        for name, fn in (("plain", plain), ("probe", probe)):
            t, m = measure(fn)
            times[name].append(t)
            peaks[name].append(m)
    tp, tq = statistics.median(times["plain"]), statistics.median(times["probe"])
    stages = breakdown(probe, args.iters)
    mp, mq = max(peaks["plain"]), max(peaks["probe"])
    name = torch.cuda.get_device_name()
    lines = [
        "# probe-backward overhead",
        "",
        f"device: {name}; torch {torch.__version__}; {args.layers}-layer Phi-3.5-mini shape, bf16, LoRA r16 all-linear, "
        f"batch {args.batch} × {args.seq}, checkpointing {args.gc}; median of {args.iters} interleaved runs",
        "",
        "| step | time (s) | peak memory (GiB) |",
        "|---|---|---|",
        f"| plain fwd+bwd | {tp:.3f} | {mp / 2**30:.2f} |",
        f"| gradflow.probe | {tq:.3f} | {mq / 2**30:.2f} |",
        f"| ratio | {tq / tp:.3f}× | {mq / mp:.3f}× |",
        "",
        f"targets (SPEC §9): time ≤ 1.10×, memory ≤ 1.05× → {'met' if tq / tp <= 1.10 and mq / mp <= 1.05 else 'NOT met'}",
        "",
        "Where the probe's time goes (host wall time of each stage, median over separate runs; the GPU keeps working "
        "behind the host until the loss is read):",
        "",
        "| stage | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.1f} |" for name, ms in stages],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


def breakdown(probe, iters: int) -> list[tuple[str, float]]:
    """Run `probe` `iters` more times with the probe's stages timed (wrapped only here, after the measured runs)."""
    import torch

    import gradflow.api as api
    import gradflow.model_state as model_state
    import gradflow.probing.backward as backward

    stages = [(backward, "describe", "describe the model (parameters, modules, hooks)"),
              (model_state.ModelState, "__init__", "capture the model's state"),
              (backward, "_step", "traced forward + backward (hooks on every module)"),
              (backward, "_fill_grads", "classify the gradients (one read of all norms)"),
              (model_state.ModelState, "restore", "put the model back"),
              (api, "findings_for", "rules"),
              (api, "build_report", "report")]
    spent: dict[str, list[float]] = {label: [] for _, _, label in stages}
    originals = []
    for owner, name, label in stages:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*a, _original=original, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                spent[_label][-1] += time.perf_counter() - t0
        setattr(owner, name, timed)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    totals = []
    try:
        for _ in range(iters):
            for times in spent.values():
                times.append(0.0)
            sync()
            t0 = time.perf_counter()
            probe()
            sync()
            totals.append(time.perf_counter() - t0)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    rows = [(label, 1e3 * statistics.median(times)) for label, times in spent.items()]
    return rows + [("whole gradflow.probe", 1e3 * statistics.median(totals))]


if __name__ == "__main__":
    main()
