"""What the live watch (GradFlowCallback) costs per training step: the same Trainer run with and without it.

One command, on a bare GPU machine (torch + CUDA, transformers 5.x, peft; gradflow installed with `pip install -e .`):

    python bench/watch_overhead.py                      # a medium Llama-shaped model, bf16, packed batches
    python bench/watch_overhead.py --preset tiny-llama --device cpu --steps 30   # a quick CPU run

It trains `--steps` steps of LoRA on random packed batches (4 x 1024 tokens by default), twice per order (off, on,
on, off) to cancel drift. A step's time is the interval between two consecutive on_step_begin events (CUDA
synchronised), so it holds everything the watch does in that step: its batch hook, its gradient check at
on_pre_optimizer_step / on_optimizer_step and its on_step_end work. The first `--warmup` steps are dropped; it prints
the mean step time of each (the mean, not the median: the gradient check runs on one step in --check-every, which a
median would not see) and each run's mean, the A/B difference in percent, and the watch's own time: its per-step
methods (the batch hook, on_pre_optimizer_step, on_optimizer_step, on_step_end) timed directly in the runs with it,
CUDA synchronised around each call, as a share of the step without it. The goal (<= 2%) is judged on that share:
the A/B difference also carries the drift between runs (measured on the H200: -25%, the runs with the watch
faster, which the watch cannot cause). With `--json PATH` the numbers go to a file too. The watch runs as gradflow train runs it (--check-every 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _model(args):
    import torch

    from gradflow.setup.build import apply_lora

    if args.preset:
        from gradflow.setup.presets import build_preset

        model = build_preset(args.preset, seed=0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                             num_key_value_heads=args.hidden // 128, vocab_size=32064,
                             max_position_embeddings=4096)
        with torch.device(args.device):  # built where it trains: a CPU init of a 1B model costs more than the run
            model = LlamaForCausalLM(config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model.to(device=args.device, dtype=dtype)
    model.config.use_cache = False
    model = apply_lora(model, 16, 32, "all-linear")
    if args.compile:  # as gradflow train compiles on CUDA: every decoder layer in place, dynamic shapes
        from gradflow.training.compiling import compile_layers

        compile_layers(model)
    return model


def _data(args, vocab: int) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.steps * 2):
        lengths = torch.randint(args.tokens // 8, args.tokens // 2, (8,), generator=g).tolist()
        group, used = [], 0
        for n in lengths:
            if used + n > args.tokens:
                break
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            group.append({"input_ids": ids, "labels": ids})
            used += n
        rows.append(group)
    return rows


def _timed(method, spent: list, torch):
    """`method`, with the wall time of each call (CUDA synchronised before and after) added to spent[0]."""

    def call(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return method(*a, **k)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - t0

    return call


WATCHED = ("_see_batch", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")  # the per-step work


def run(args, watch: bool) -> tuple[list[float], float]:
    """(step times after warm-up, the watch's own seconds over those steps: 0 without it)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradflow.data.packing import PackedCollator
    from gradflow.training.callback import GradFlowCallback

    spent = [0.0]

    class Timer(TrainerCallback):
        """Stamps each on_step_begin; a step is the interval to the next one (all callbacks' work included)."""

        def __init__(self):
            self.stamps, self.spent_at = [], []

        def _stamp(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.spent_at.append(spent[0])

        def on_step_begin(self, *a, **k):
            self._stamp()

        def on_train_end(self, *a, **k):
            self._stamp()

        @property
        def times(self):
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    model = _model(args)
    packed = PackedCollator()
    timer = Timer()
    callbacks = [timer]
    if watch:
        cb = GradFlowCallback(check_every=10, moved_at_step=5, preflight=False)
        for name in WATCHED:  # instance attributes: Trainer's CallbackHandler and the batch hook call these
            setattr(cb, name, _timed(getattr(cb, name), spent, torch))
        callbacks.append(cb)
    targs = TrainingArguments(output_dir="/tmp/gradflow-watch-overhead", per_device_train_batch_size=1,
                              max_steps=args.steps, learning_rate=1e-4, report_to="none", disable_tqdm=True,
                              save_strategy="no", logging_steps=10, remove_unused_columns=False,
                              bf16=args.dtype == "bf16", use_cpu=args.device == "cpu", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=_data(args, model.config.vocab_size),
                      data_collator=lambda groups: packed([r for g in groups for r in g]), callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its log dicts would bury the result
    trainer.train()
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    own = timer.spent_at[-1] - timer.spent_at[args.warmup] if len(timer.spent_at) > args.warmup else 0.0
    return timer.times[args.warmup:], own


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a gradflow preset instead of the medium Llama shape")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per packed batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--compile", action="store_true", help="compile the decoder layers as gradflow train does on "
                        "CUDA (compiled once: the later runs reuse the graphs)")
    args = parser.parse_args(argv)
    times = {"off": [], "on": []}
    runs, own = [], 0.0
    for watch in (False, True, True, False):
        steps, spent = run(args, watch)
        times["on" if watch else "off"] += steps
        own += spent
        runs.append({"watch": watch, "mean_step_s": statistics.fmean(steps), "watch_own_s": spent})
    off, on = statistics.fmean(times["off"]), statistics.fmean(times["on"])
    overhead = 100 * (on - off) / off
    # the watch's own time per step (its methods timed directly, CUDA synchronised) against the step without it:
    # free of the drift between runs that the A/B difference above carries
    own_percent = 100 * (own / len(times["on"])) / off
    result = {"step_s_without_watch": off, "step_s_with_watch": on, "overhead_percent": round(overhead, 2),
              "watch_own_s_per_step": own / len(times["on"]), "watch_own_percent": round(own_percent, 3),
              "runs": runs, "median_step_s": {k: statistics.median(v) for k, v in times.items()},
              "steps_timed": len(times["on"]), "goal_percent": 2.0, "met": own_percent <= 2.0, "args": vars(args)}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    except Exception:
        pass
    print(f"mean step: {off * 1000:.1f} ms without the watch, {on * 1000:.1f} ms with it ({overhead:+.2f}%; per run: "
          + ", ".join(f"{'on' if r['watch'] else 'off'} {r['mean_step_s'] * 1000:.1f}" for r in runs) + " ms)")
    print(f"the watch's own time: {own / len(times['on']) * 1000:.2f} ms per step = {own_percent:.3f}% of a step "
          f"(goal <= 2%: {'met' if own_percent <= 2.0 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
