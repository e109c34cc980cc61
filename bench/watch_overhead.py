"""What the live watch (GradFlowCallback) costs per training step: the same Trainer run with and without it.

One command, on a bare GPU machine (torch + CUDA, transformers 5.x, peft; gradflow installed with `pip install -e .`):

    python bench/watch_overhead.py                      # a medium Llama-shaped model, bf16, packed batches
    python bench/watch_overhead.py --preset tiny-llama --device cpu --steps 30   # a quick CPU run

It trains `--steps` steps of LoRA on random packed batches (4 x 1024 tokens by default), twice per order (off, on,
on, off) to cancel drift, times each step between on_step_begin and on_step_end (CUDA synchronised), drops the
first `--warmup` steps, and prints the median step time of each, the overhead in percent and the goal (<= 2%).
With `--json PATH` the numbers go to a file too. The watch runs as gradflow train runs it (--check-every 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _model(args):
    import torch

    from gradflow.recipe import apply_lora

    if args.preset:
        from gradflow.presets import build_preset

        model = build_preset(args.preset, seed=0)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                             num_key_value_heads=args.hidden // 128, vocab_size=32064,
                             max_position_embeddings=4096)
        model = LlamaForCausalLM(config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model.to(device=args.device, dtype=dtype)
    model.config.use_cache = False
    return apply_lora(model, 16, 32, "all-linear")


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


def run(args, watch: bool) -> list[float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradflow.packing import PackedCollator
    from gradflow.training.callback import GradFlowCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    model = _model(args)
    packed = PackedCollator()
    timer = Timer()
    callbacks = [timer] + ([GradFlowCallback(check_every=10, moved_at_step=5, preflight=False)] if watch else [])
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
    return timer.times[args.warmup:]


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
    args = parser.parse_args(argv)
    times = {"off": [], "on": []}
    for watch in (False, True, True, False):
        times["on" if watch else "off"] += run(args, watch)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    overhead = 100 * (on - off) / off
    result = {"step_s_without_watch": off, "step_s_with_watch": on, "overhead_percent": round(overhead, 2),
              "goal_percent": 2.0, "met": overhead <= 2.0, "args": vars(args)}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    except Exception:
        pass
    print(f"median step: {off * 1000:.1f} ms without the watch, {on * 1000:.1f} ms with it: "
          f"{overhead:+.2f}% (goal <= 2%: {'met' if overhead <= 2.0 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
