"""CLI start-up time: `gradflow --help` and `gradflow explain GF101` must stay instant (no torch import).

Each command runs in a fresh interpreter, N times (default 5); the table gives min / median / max wall time, and
also the time of a bare `python -c pass` and of `import torch`, so the numbers can be read against the machine.
Timing lives here, never in tests (STYLE: benchmarks under bench/, results committed with the machine named).

    python bench/cli_startup.py [--runs 5] [--out bench/results/cli_startup.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f} at start"
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}{load}"


def wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "cli_startup.md"))
    args = ap.parse_args()

    # the console script beside this interpreter (its venv), else the module entry point
    script = Path(sys.executable).with_name("gradflow")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "gradflow.cli"]
    cases = [
        ("python -c pass (interpreter floor)", [sys.executable, "-c", "pass"]),
        ("gradflow --help", entry + ["--help"]),
        ("gradflow explain GF101", entry + ["explain", "GF101"]),
        ("gradflow explain (list)", entry + ["explain"]),
        ("python -c 'import torch' (for scale)", [sys.executable, "-c", "import torch"]),
    ]
    import torch
    import transformers
    import typer

    rows = []
    for label, argv in cases:
        wall(argv, 1)  # warm the file cache: the table is about steady start-up, not a cold disk
        t = wall(argv, args.runs)
        rows.append((label, min(t), statistics.median(t), max(t)))
        print(f"{label:<40} median {statistics.median(t):.3f}s", file=sys.stderr)

    lines = [
        "# CLI start-up time",
        "",
        f"machine: {machine()}",
        f"stack: torch {torch.__version__}, transformers {transformers.__version__}, typer {typer.__version__}",
        f"entry point: `{' '.join(Path(e).name if i == 0 else e for i, e in enumerate(entry))}`; "
        f"{args.runs} runs each in a fresh process after one warm-up run; wall time in seconds",
        "",
        "| command | min | median | max |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {lo:.3f} | {med:.3f} | {hi:.3f} |" for label, lo, med, hi in rows]
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", "The machine was busy with other work during these runs (load above its core count): "
                      "read the numbers as upper bounds."]
    lines += ["", "`--help` and `explain` never import torch, transformers or peft "
                  "(tests/cli/test_explain.py checks the imports; this file only measures)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
