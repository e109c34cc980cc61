"""Dry runs of published architectures on ONE CPU core: dense, mixture-of-experts and a vision-language model.

Each config in bench/configs/*.json (written from the published config.json, with the real dimensions; nothing is
downloaded) runs `probe-backward <config> --dry-run` with LoRA on all linear layers and reentrant checkpointing, as
its own `python -m gradflow.cli` process pinned to CPU 0 (`taskset -c 0`). The time includes interpreter start-up
and the torch/transformers/peft imports, as a user sees it. Peak RSS is that process's ru_maxrss (os.wait4), CPU time
its user + sys. The load average before each run is recorded: the machine may be shared, and a pinned process gets
only its share of core 0.

Goal (issue 20): every config <= 30 s wall and <= 2 GiB peak RSS, on both stacks.

    python bench/dry_run_configs.py [--runs 1] [--only qwen3-235b-a22b ...] [--out bench/results/dry_run_configs_X.txt]

Runs with the interpreter that runs it (use each venv's python to measure both stacks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dry_run_70b import machine, stack  # bench/: the same machine and stack lines

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bench" / "configs"
SETUP = ["--lora-r", "16", "--lora-targets", "all-linear", "--gc", "reentrant", "--device", "cpu"]
GOAL_S, GOAL_GIB = 30.0, 2.0
ORDER = ("llama-3-70b", "llama-3.1-405b", "mixtral-8x22b", "qwen3-235b-a22b", "deepseek-v3", "gemma-3-27b")


def measured(config: Path) -> dict:
    """One pinned CLI process: wall time, CPU time, peak RSS, exit code, the load average before it, its report."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    argv = [*pin, sys.executable, "-m", "gradflow.cli", "probe-backward", str(config), "--dry-run", *SETUP,
            "--format", "json"]
    load = os.getloadavg()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        pid = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO).pid
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    row = {"name": config.stem, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
           "rss_gib": usage.ru_maxrss / 2**20, "code": os.waitstatus_to_exitcode(status), "load": load,
           "pinned": bool(pin)}
    if row["code"] not in (0, 1):
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        return row
    report = json.loads(stdout)
    info = report["dry_run"]
    row.update(cls=info["config_class"], params_total=report["model"]["params_total"],
               params_trainable=report["model"]["params_trainable"], config=info["config"], twin=info["twin"],
               param_rows=report["params"]["trainable"], none_grad=report["params"]["none_grad"],
               unmapped=info["unmapped_count"],
               findings=", ".join(f["slug"] for f in report["findings"]) or "none")
    return row


def render(rows: list[dict], when: str) -> str:
    lines = [f"date: {when}", f"machine: {machine()} (runs pinned to CPU 0)", f"stack: {stack()}",
             f"command: taskset -c 0 python -m gradflow.cli probe-backward bench/configs/<name>.json --dry-run "
             f"{' '.join(SETUP)} --format json", "",
             "| config | class | wall s | CPU s | peak RSS GiB | load 1/5/15 min before | exit | params (full) | "
             "trainable (LoRA r=16) | experts real -> twin | twin hidden | none-grad | findings | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = "/".join(f"{x:.1f}" for x in r["load"])
        if "error" in r:
            lines.append(f"| {r['name']} | - | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_gib']:.2f} | {load} | "
                         f"{r['code']} | - | - | - | - | - | {r['error']} | FAILS |")
            continue
        experts = (f"{r['config']['experts']} -> {r['twin'].get('experts')}" if "experts" in r["config"] else "-")
        ok = r["wall_s"] <= GOAL_S and r["rss_gib"] <= GOAL_GIB
        lines.append(f"| {r['name']} | {r['cls']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_gib']:.2f} | "
                     f"{load} | {r['code']} | {r['params_total']:,} | {r['params_trainable']:,} | {experts} | "
                     f"{r['config']['hidden_size']} -> {r['twin']['hidden_size']} | {r['none_grad']} | "
                     f"{r['findings']} | {'meets' if ok else 'MISSES'} |")
    lines.append("")
    lines.append(f"goal: <= {GOAL_S:.0f} s wall and <= {GOAL_GIB:.0f} GiB peak RSS per config, one core. Wall time on "
                 "a shared machine is CPU time stretched by the load: compare the CPU column across runs.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="config names (bench/configs/<name>.json)")
    parser.add_argument("--out", default=None, help="write the table here")
    args = parser.parse_args()
    names = args.only or [n for n in ORDER if (CONFIGS / f"{n}.json").is_file()]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for name in names:
        for _ in range(args.runs):
            r = measured(CONFIGS / f"{name}.json")
            rows.append(r)
            print(f"{name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['rss_gib']:.2f} GiB, exit "
                  f"{r['code']}, load {r['load'][0]:.2f} {r.get('error', '')}", file=sys.stderr, flush=True)
    text = render(rows, when)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
