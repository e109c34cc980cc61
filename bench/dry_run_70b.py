"""Dry run of a Llama-3-70B-shaped config on CPU: `inspect --dry-run` and `probe-backward --dry-run`, no weights.

Goal (SPEC §9): each finishes in <= 30 s with <= 4 GiB peak RSS on a 2-core CPU, with LoRA on all linear layers and
reentrant checkpointing. The config (LlamaConfig: 80 layers, hidden 8192, 64 query / 8 key-value heads,
intermediate 28672, vocab 128256, bf16) is written to a temp dir; each command runs as its own `python -m
gradflow.cli` process, so the time includes interpreter start-up and the torch/transformers/peft imports, as a
user sees it. Peak RSS is that process's ru_maxrss (os.wait4). The load average is recorded next to each run: on a
shared machine the same command takes longer when other work runs beside it.

    python bench/dry_run_70b.py [--runs 3] [--out bench/results/dry_run_70b_cpu.md]

Runs with the interpreter that runs it (use each venv's python to measure both stacks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = ["--lora-r", "16", "--lora-targets", "all-linear", "--gc", "reentrant", "--device", "cpu"]
GOAL_S, GOAL_GIB = 30.0, 4.0


def write_config(folder: str) -> str:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    return os.path.join(folder, "config.json")


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def stack() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradflow-70b-") as tmp:
        config = write_config(tmp)
        commands = {
            "inspect --dry-run": ["inspect", config, "--dry-run", *SETUP, "--format", "json"],
            "probe-backward --dry-run": ["probe-backward", config, "--dry-run", *SETUP, "--format", "json"],
        }
        for name, argv in commands.items():
            for i in range(args.runs):
                r = _measured(argv)
                if r["code"] not in (0, 1):
                    sys.exit(f"{name} failed (exit {r['code']}): {r['stderr'][-2000:]}")
                report = json.loads(r["stdout"])
                r.update(name=name, params_total=report["model"]["params_total"],
                         params_trainable=report["model"]["params_trainable"],
                         findings=", ".join(f["slug"] for f in report["findings"]) or "none",
                         none_grad=report["params"]["none_grad"])
                rows.append(r)
                print(f"{name} run {i + 1}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['rss_gib']:.2f} GiB peak RSS, exit {r['code']}, "
                      f"load {r['load']:.2f}, findings: {r['findings']}", flush=True)
    text = render(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _measured(argv: list[str]) -> dict:
    """One CLI process: wall time, its own peak RSS (os.wait4), exit code, the load average before it, its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        pid = subprocess.Popen([sys.executable, "-m", "gradflow.cli", *argv], stdout=out, stderr=err, env=env,
                               cwd=REPO).pid
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_gib": usage.ru_maxrss / 2**20, "code": os.waitstatus_to_exitcode(status),
                "load": load, "stdout": out.read().decode(), "stderr": err.read().decode()}


def render(rows: list[dict]) -> str:
    lines = [f"machine: {machine()}", f"stack: {stack()}", f"setup: {' '.join(SETUP)}", "",
             "| command | run | wall s | CPU s (user+sys) | peak RSS GiB | load avg before | exit | findings |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['name']} | {i % max(1, sum(x['name'] == r['name'] for x in rows)) + 1} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_gib']:.2f} | {r['load']:.2f} | {r['code']} | {r['findings']} |")
    lines.append("")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        worst_s = max(r["wall_s"] for r in mine)
        worst_gib = max(r["rss_gib"] for r in mine)
        ok = worst_s <= GOAL_S and worst_gib <= GOAL_GIB
        lines.append(f"- {name}: median {statistics.median(r['wall_s'] for r in mine):.1f} s, worst {worst_s:.1f} s "
                     f"(CPU median {statistics.median(r['cpu_s'] for r in mine):.1f} s), "
                     f"peak RSS {worst_gib:.2f} GiB: {'meets' if ok else 'MISSES'} the goal (<= {GOAL_S:.0f} s, "
                     f"<= {GOAL_GIB:.0f} GiB); full size {mine[0]['params_total']:,} parameters, "
                     f"{mine[0]['params_trainable']:,} trainable")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
