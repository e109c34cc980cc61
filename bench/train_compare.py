"""`gradflow train` against the seed-style Trainer and TRL's SFTTrainer: real tokens/s, peak memory, MFU, loss.

One command on a GPU machine (from the repository root):

    python bench/train_compare.py            # LoRA, bf16: runs a, a-gc, b, c, d
    python bench/train_compare.py --qlora    # the same on a 4-bit (nf4, bf16 compute) base
    python bench/train_compare.py --smoke    # everything tiny on CPU, to test the script (~1-2 min)

Runs (each in its own subprocess, so that each peak is its own; the same data, model, LoRA and step count):
    a     `gradflow train` as a user types it (packing, memory plan, --ce auto: gradflow's defaults)
    a-gc  `gradflow train --gc non-reentrant --gc-every 1`: every layer checkpointed, as TRL does
    a-ce  `gradflow train --ce standard`: the full-logits loss, to measure the chunked one (not in the default set)
    a-eager `gradflow train --compile off`: the decoder layers not compiled, to measure torch.compile
    b     seed-style Trainer: every sample padded to --seq-len, reentrant checkpointing + enable_input_require_grads
    c     TRL SFTTrainer with its defaults (pad to the longest row, checkpointing on)
    d     TRL SFTTrainer packing=True (packing_strategy "bfd", padding-free), the model on flex_attention
    d-liger  run d with use_liger_kernel=True (liger-kernel's fused kernels and linear cross-entropy; bench/peers.py)
    unsloth  Unsloth's own recipe (FastLanguageModel, its checkpointing, adamw_8bit) on the same weights and LoRA
Where a peer cannot run (not installed, an unsupported model), its row says why (the exception as raised), and the
other runs go on.

Startup: every run also records the time from its process start to the end of its first optimizer step, split into
stages (imports; model; data and trainer set-up; Trainer.train() to step 1), and gradflow's runs add their own
report's breakdown (train.startup: data, model, quantization, plan, pre-flight, compile, ...). The whole run
(`worker_wall_s`) is the process's wall time.

Every run is timed by the same instrumentation: transformers.Trainer is patched in the subprocess so that its data
collator counts the real (non-pad) tokens of every batch it builds and a callback stamps the clock (after a CUDA
sync) at the end of step --warmup and of step --warmup + --steps. Tokens/s = the real tokens of the counted steps /
their wall time. MFU = tokens/s x (4 + 2 x checkpointed share) x N / peak, N the base model's parameters (SPEC §9:
6·N FLOPs per token with checkpointing, 4·N without, attention FLOPs not counted), peak 989 TFLOP/s bf16 dense on
an H100/H200 (--peak-tflops otherwise). Results: bench/results/train_compare_<device>.json and a table in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")

RUNS = {
    "a": "gradflow train (defaults: packed, planned, compiled on CUDA)",
    "a-gc": "gradflow train --gc non-reentrant --gc-every 1",
    "a-ce": "gradflow train --ce standard",
    "a-eager": "gradflow train --compile off",
    "a-gc-eager": "gradflow train --gc non-reentrant --gc-every 1 --compile off",
    "b": "seed-style Trainer (pad to max, reentrant GC + input-grad hook)",
    "c": "TRL SFTTrainer, defaults (pad to longest)",
    "d": "TRL SFTTrainer, packing=True (bfd, padding-free), flex_attention",
    "d-liger": "TRL SFTTrainer as d, use_liger_kernel=True",
    "unsloth": "Unsloth FastLanguageModel + SFTTrainer (its recommended settings)",
}
PEERS = ("d-liger", "unsloth")  # their own packages are checked by the run itself: a missing one fails that run only
DEFAULT_RUNS = ("a", "a-gc", "b", "c", "d")
NEEDS = {  # module -> what it is for; torch/transformers/peft/accelerate are gradflow's own requirements
    "torch": "everything", "transformers": "every run", "peft": "LoRA", "accelerate": "transformers.Trainer",
    "trl": "runs c and d (SFTTrainer)", "datasets": "runs c and d (SFTTrainer takes a datasets.Dataset)",
    "typer": "run a (the gradflow CLI)", "rich": "run a (the gradflow CLI)",
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
LOSS_WINDOWS = 4  # the loss comparison: the common token range in this many windows
LOSS_ABS_TOL = 0.05  # nats: the least difference of window means called a disagreement


# ----- the parent: check, generate data, run each worker, compare, write --------------------------------------
def _missing(modules) -> list[str]:
    """The modules that do not import, each with the dependency that failed when it is another one."""
    out = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as exc:
            inner = getattr(exc, "name", None)
            out.append(m if inner in (None, m) else f"{m} (needs {inner})")
    return out


def _die(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(2)


def check_requirements(runs, qlora: bool, smoke: bool) -> dict:
    """The versions of what the runs need; exits 2 naming what is missing and how to install it."""
    need = ["torch", "transformers", "peft", "accelerate"]
    if any(r.startswith("a") for r in runs):
        need += ["typer", "rich"]
    if any(r in ("c", "d", *PEERS) for r in runs):
        need += ["trl", "datasets"]
    if qlora:
        need.append("bitsandbytes")
    missing = _missing(need)
    if missing:
        why = "; ".join(f"{m}: {NEEDS.get(m.split()[0], '--qlora (4-bit)')}" for m in missing)
        _die(f"train_compare: missing {', '.join(missing)} ({why}).\n"
                 f"  pip install {' '.join(m.split()[-1].rstrip(')') for m in missing)}   (or from wheels: "
                 f"pip install --no-deps WHEEL...; see docs/benchmarks.md), or leave those runs out with --only")
    import torch

    if not smoke and not torch.cuda.is_available():
        _die("train_compare: no CUDA device (torch.cuda.is_available() is False). Use --smoke to test on CPU.")
    versions = {"python": sys.version.split()[0]}
    for m in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "gradflow"):
        try:
            versions[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as exc:  # an optional package that is absent or broken is reported, not fatal
            versions[m] = f"unavailable ({type(exc).__name__})"
    for dist in ("liger-kernel", "unsloth", "unsloth_zoo", "triton"):  # not imported here: unsloth patches on import
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unavailable (not installed)"
    versions["cuda"] = torch.version.cuda
    return versions


def device_name(smoke: bool) -> tuple[str, str]:
    """(full name, short slug for file names): 'NVIDIA H200' -> 'H200'."""
    import torch

    if smoke or not torch.cuda.is_available():
        return "cpu", "cpu-smoke"
    # asked in a subprocess: a CUDA context in this process would hold GPU memory through every run
    full = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    slug = next((k for k in PEAK_TFLOPS if k in full), re.sub(r"[^A-Za-z0-9]+", "-", full).strip("-"))
    return full, slug


def commit() -> str:
    env = os.environ.get("GRADFLOW_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; set GRADFLOW_COMMIT)"


def model_params(preset: str) -> int:
    """N: the base model's parameter count, from its config on the meta device (4-bit packing does not shrink it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradflow.setup.presets import preset_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(preset))
    return sum(p.numel() for p in model.parameters())


def gradflow_flags() -> set[str]:
    """The options this checkout's `gradflow train` has (the run variants use only those that exist)."""
    out = subprocess.run([sys.executable, "-m", "gradflow.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env=_env(), timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out.stdout + out.stderr))


def _env(threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # parallel CPU runs: one thread each, not oversubscribed
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _merged(results: dict, prior: dict) -> dict:
    """This command's runs, each stamped with the command that measured it, over the same mode's runs from an
    earlier command at this commit (a part of bench/gpu_check_issue19.sh adds peers to the lora runs; it must not
    drop them). Runs from another commit are dropped: they are not comparable."""
    called = {"command": "python bench/train_compare.py " + " ".join(sys.argv[1:]),
              "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    for r in results.values():
        r.setdefault("measured_in", called)
    if prior.get("commit") != commit():
        return results
    return {**{run: r for run, r in prior.get("results", {}).items() if run not in results}, **results}


def _peer_env(cfg) -> dict:
    """The unsloth run's own packages, where they cannot live beside the latest stack (bench/requirements-peers.txt):
    GRADFLOW_BENCH_UNSLOTH_SITE names a folder put first on that run's PYTHONPATH, so it runs side by side with the
    others in one call."""
    site = os.environ.get("GRADFLOW_BENCH_UNSLOTH_SITE")
    if cfg.run != "unsloth" or not site:
        return {}
    return {"PYTHONPATH": site + os.pathsep + _env()["PYTHONPATH"]}


def _cache_env(cfg) -> dict:
    """--cache cold: every run (TRL's flex_attention compiles too) starts without compiled kernels or cached data."""
    if cfg.cache != "cold":
        return {}
    where = os.path.join(cfg.workdir, f"caches-{cfg.run}")
    return {"GRADFLOW_CACHE_DIR": os.path.join(where, "gradflow"), "TORCHINDUCTOR_CACHE_DIR":
            os.path.join(where, "inductor"), "TRITON_CACHE_DIR": os.path.join(where, "triton")}


@dataclasses.dataclass
class Config:
    """What every worker gets (as JSON): the shared setup, and where to write its result."""

    run: str
    preset: str
    device: str
    dtype: str
    bf16: bool
    quant: str
    seq_len: int
    batch_size: int
    warmup: int
    steps: int
    profile: bool
    data: str
    workdir: str
    result: str
    loss_on: str
    lr: float
    attn_packed: str  # attention for run d: flex_attention on CUDA, sdpa for --smoke on CPU
    gradflow_flags: list
    profile_out: str = ""
    memory_trace: bool = False  # one more step, recorded by the CUDA allocator (bench/memory_trace.py)
    memory_trace_out: str = ""
    cache: str = "cold"  # cold: each run its own empty compile and data caches; warm: the user's (~/.cache/gradflow)


def run_worker(cfg: Config, timeout: int, log_path: str, threads: int | None = None) -> dict:
    cfg_path = os.path.join(cfg.workdir, f"config-{cfg.run}.json")
    with open(cfg_path, "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", cfg_path], cwd=ROOT,
                                  env=_env(threads) | _cache_env(cfg) | _peer_env(cfg), stdout=log,
                                  stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = round(time.perf_counter() - t0, 1)
    result = {}
    if os.path.exists(cfg.result):
        with open(cfg.result) as fh:
            result = json.load(fh)
    title = RUNS[cfg.run]
    if cfg.run == "d" and cfg.attn_packed != "flex_attention":
        title = title.replace("flex_attention", f"{cfg.attn_packed} (--smoke: flex_attention needs CUDA)")
    result.update({"run": cfg.run, "title": title, "worker_rc": rc, "worker_wall_s": wall})
    if rc != 0 or "error" in result:
        with open(log_path, errors="replace") as fh:
            result["log_tail"] = fh.read()[-3000:]
    return result


def loss_agreement(results: dict, reference: str) -> dict:
    """Each run's loss against the reference's at equal real tokens seen: window means over the common range.

    Tolerance: a window differs when |mean - mean_ref| > max(LOSS_ABS_TOL, 3 x the two means' combined standard
    error); per-batch losses vary with what each batch holds, and runs batch the data differently.
    """
    import statistics

    def curve(r):
        seen, points = 0, []
        for tokens, loss in zip(r["tokens_per_step"], r["losses"]):
            seen += tokens
            points.append((seen - tokens / 2, loss))  # the step's loss sits at its tokens' midpoint
        return seen, points

    ok = {k: r for k, r in results.items() if r.get("losses") and r.get("tokens_per_step")}
    if reference not in ok:
        return {"reference": reference, "note": "the reference run has no loss curve"}
    common = min(curve(r)[0] for r in ok.values())
    edges = [common * i / LOSS_WINDOWS for i in range(LOSS_WINDOWS + 1)]

    def windows(points):
        out = []
        for lo, hi in zip(edges, edges[1:]):
            vals = [loss for x, loss in points if lo <= x < hi]
            if not vals:
                out.append(None)
                continue
            se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
            out.append((statistics.fmean(vals), se, len(vals)))
        return out

    ref = windows(curve(ok[reference])[1])
    report = {"reference": reference, "common_tokens": common, "windows": LOSS_WINDOWS,
              "tolerance": f"|mean - mean_ref| <= max({LOSS_ABS_TOL} nats, 3 x combined standard error) per window",
              "runs": {}}
    for name, r in ok.items():
        mine, rows, agree = windows(curve(r)[1]), [], True
        for (lo, hi), a, b in zip(zip(edges, edges[1:]), mine, ref):
            if a is None or b is None:
                rows.append({"tokens": [int(lo), int(hi)], "note": "no step in this window"})
                continue
            se = math.sqrt(sum(x * x for x in (a[1], b[1]) if not math.isnan(x)))
            tol = max(LOSS_ABS_TOL, 3 * se)
            diff = a[0] - b[0]
            agree &= abs(diff) <= tol
            rows.append({"tokens": [int(lo), int(hi)], "mean": round(a[0], 4), "ref": round(b[0], 4),
                         "diff": round(diff, 4), "tol": round(tol, 4), "steps": a[2]})
        report["runs"][name] = {"agree": agree, "windows": rows}
    return report


def summarize(results: dict, n_params: int, peak_tflops: float | None) -> None:
    """Adds flops per token and MFU to each result (SPEC §9: 6·N with checkpointing, 4·N without)."""
    for r in results.values():
        if not r.get("tokens_per_second"):
            continue
        share = r.get("checkpointed_share")
        share = 0.0 if share is None else share
        r["flops_per_token"] = (4 + 2 * share) * n_params
        r["mfu"] = round(r["tokens_per_second"] * r["flops_per_token"] / (peak_tflops * 1e12), 4) \
            if peak_tflops else None


def markdown(doc: dict, mode: str) -> str:
    m = doc["modes"][mode]
    when = {k: m.get(k, doc.get(k)) for k in ("commit", "date", "versions")}  # per mode: two commands, two commits
    base, *tags = mode.split("-", 1)
    tag = tags[0] if tags else ""
    title = {"lora": "LoRA", "qlora": "QLoRA"}.get(base, base)
    title += {"warm": ", warm caches (a second run)", "vs-seed": " against the seed-style Trainer",
              "peers": " against the peers, side by side in one command"}.get(tag, f" ({tag})" if tag else "")
    lines = [f"### {title} on {doc['device']} ({when['commit'][:12]}, {when['date']})", "",
             f"{m['model']} (N = {_count(m['n_params'])}), {m['dtype']}, LoRA r16/α32 all linear"
             f"{', 4-bit nf4 base' if base == 'qlora' else ''}; {m['samples']} /think samples "
             f"(bench/think_data.py, seed 0), --seq-len {m['seq_len']}, batch {m['batch_size']} "
             f"(packed: {m['batch_size'] * m['seq_len']} tokens); steps {m['warmup'] + 1}–"
             f"{m['warmup'] + m['steps']} counted. Versions: "
             + ", ".join(f"{k} {v}" for k, v in when["versions"].items() if not str(v).startswith("unavail")) + ".",
             "", "| run | real tok/s | vs b | peak alloc GiB | peak reserved GiB | checkpointed | attention (CE) | MFU "
                 "| loss agrees | to step 1 s | whole run s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = m["results"].get("b", {}).get("tokens_per_second")
    agreement = m.get("loss", {}).get("runs", {})
    for name, r in m["results"].items():
        if not r.get("tokens_per_second"):
            lines.append(f"| {name}: {r['title']} | failed (rc {r.get('worker_rc')}): "
                         f"{(r.get('error') or '').splitlines()[0][:120] if r.get('error') else 'see JSON'} "
                         "| | | | | | | | | |")
            continue
        gc, mfu = r.get("checkpointed_share"), r.get("mfu")
        agree = agreement.get(name, {}).get("agree")
        tps = r["tokens_per_second"]
        cells = [f"{name}: {r['title']}", f"{tps:,.0f}", f"{tps / base:.2f}×" if base else "–",
                 _gib(r.get("peak_allocated")), _gib(r.get("peak_reserved")), "–" if gc is None else f"{gc:.0%}",
                 str(r.get("attention", "?")) + (f", CE {r['ce']}" + (" (fell back)" if r.get("ce_fallback") else "")
                                                 if r.get("ce") else "") + (", compiled" if r.get("compiled") else ""),
                 "–" if mfu is None else f"{mfu:.1%}",
                 "–" if agree is None else "yes" if agree else "NO", _secs(_first_step(r)),
                 _secs(r.get("worker_wall_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += startup_table(m["results"])
    calls: dict[str, list[str]] = {}
    for name, r in m["results"].items():
        if r.get("measured_in"):
            calls.setdefault(f"`{r['measured_in']['command']}` ({r['measured_in']['at']})", []).append(name)
    if len(calls) > 1:  # runs side by side in one command each: say which
        lines += ["", "Measured in " + str(len(calls)) + " commands on the same machine kind and commit: "
                  + "; ".join(f"{', '.join(names)} in {call}" for call, names in calls.items()) + "."]
    loss = m.get("loss", {})
    if loss.get("tolerance"):
        lines += ["", f"Loss vs real tokens seen, against run {loss['reference']} over the first "
                      f"{loss['common_tokens']:,} tokens in {loss['windows']} windows; tolerance: {loss['tolerance']}."]
    return "\n".join(lines) + "\n"


def _first_step(r: dict):
    return (r.get("startup") or {}).get("time_to_first_step_s")


def _secs(x) -> str:
    return "–" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


GRADFLOW_STAGES = ("imports", "data", "model", "quantization", "plan", "preflight", "compile", "trainer",
                   "first_step")


def startup_table(results: dict) -> list[str]:
    """The startup breakdown, side by side: every run's stages on the bench's clock (from its process start), and for
    gradflow's runs the stages its own report records (train.startup)."""
    lines = ["", "Before the first optimizer step, in seconds from the process start (the bench's clock, every run "
                 "alike; gradflow's own report splits its set-up further, and its compile happens inside step 1):", "",
             "| run | to step 1 | imports | set-up before Trainer.train() | of it: model / data + trainer | "
             "Trainer.train() → step 1 | gradflow: " + " / ".join(GRADFLOW_STAGES[1:]) + " |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        stages = (r.get("startup") or {}).get("stages") or {}
        if _first_step(r) is None:  # no step taken: the run's failure is in the table above
            continue
        setup = sum(stages.get(k) or 0 for k in ("model", "data_and_trainer", "trainer_setup"))
        split = " / ".join(_secs(stages.get(k)) for k in ("model", "data_and_trainer")) \
            if "model" in stages else "–"
        own = r.get("gradflow_startup") or {}
        detail = " / ".join(_secs(own.get(f"{s}_s")) for s in GRADFLOW_STAGES[1:]) if own else ""
        if own and (own.get("compile") or {}).get("graphs"):
            c = own["compile"]
            detail += (f" ({c['graphs']} graphs, {c.get('recompiles', 0)} recompiles, {c.get('graph_breaks', 0)} "
                       f"graph breaks, FX cache "
                       f"{c.get('fx_cache_hits', 0)} hits / {c.get('fx_cache_misses', 0)} misses)")
        if own and ((own.get("cache") or {}).get("data") or {}).get("status"):
            detail += f" (data cache {own['cache']['data']['status']})"
        lines.append(f"| {name} | {_secs(_first_step(r))} | {_secs(stages.get('imports'))} | {_secs(setup)} | "
                     f"{split} | {_secs(stages.get('train_to_first_step'))} | {detail} |")
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.1f}"


def write_docs(text: str, key: str) -> None:
    """Replace this device/mode's section of docs/benchmarks.md (between markers), or append it."""
    start, end = f"<!-- train_compare:{key} -->", f"<!-- /train_compare:{key} -->"
    block = f"{start}\n{text}{end}\n"
    doc = open(DOCS).read() if os.path.exists(DOCS) else "# Benchmarks\n\n"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) + 1:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    with open(DOCS, "w") as fh:
        fh.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qlora", action="store_true", help="4-bit nf4 base (bitsandbytes), bf16 compute")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, few steps: tests the script")
    ap.add_argument("--only", help=f"comma-separated runs out of {', '.join(RUNS)} (default {','.join(DEFAULT_RUNS)})")
    ap.add_argument("--steps", type=int, help="counted steps (default 35: steps 6-40)")
    ap.add_argument("--warmup", type=int, help="steps before the counted ones (default 5)")
    ap.add_argument("--samples", type=int, help="samples generated (default 512)")
    ap.add_argument("--seq-len", type=int, help="max length (default 2048)")
    ap.add_argument("--batch-size", type=int, help="rows per step (default 4; packed runs: x seq-len tokens)")
    ap.add_argument("--loss-on", choices=("all", "completion"), default="all",
                    help="all: every token (TRL's default); completion: assistant tokens in every run")
    ap.add_argument("--profile", nargs="?", const="all", default=None,
                    help="also profile 3 steps after the counted ones, for these runs (default: all run)")
    ap.add_argument("--memory-trace", metavar="RUNS", default="",
                    help="one more step after the others, for these runs (comma-separated), recorded by the CUDA "
                         "allocator: what is alive at its peak, by where it was allocated (bench/memory_trace.py)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run (a QLoRA run on an H100 takes ~2-4 "
                                                              "minutes with its start-up)")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: each run starts with empty compile and data caches (a first run); warm: the "
                         "user's caches, as a second run of the same job finds them (run the command twice)")
    ap.add_argument("--tag", help="a table of its own for this command's runs (mode lora-TAG / qlora-TAG), e.g. "
                                   "peers: the peers beside their own d, side by side in one command")
    ap.add_argument("--jobs", type=int, help="runs at once (default 1; --smoke: all)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--results-dir", help="where the JSON, tables and profiles go (default bench/results; --smoke: "
                                           "a temp directory), e.g. $OUT on the device")
    ap.add_argument("--docs-from", metavar="JSON", help="only write docs/benchmarks.md's tables from a results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.docs_from:
        doc = json.load(open(args.docs_from))
        slug = os.path.basename(args.docs_from)[len("train_compare_"):-len(".json")]
        for mode in doc.get("modes", {}):
            write_docs(markdown(doc, mode), f"{slug}:{mode}")
            print(f"docs/benchmarks.md: {slug} {mode} table written")
        return 0

    runs = [r.strip() for r in (args.only or ",".join(DEFAULT_RUNS)).split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown run {', '.join(unknown)}: pick from {', '.join(RUNS)}")
    sys.path.insert(0, ROOT)
    versions = check_requirements(runs, args.qlora, args.smoke)
    full_name, slug = device_name(args.smoke)
    smoke = args.smoke
    preset = "tiny-phi3" if smoke else "phi3.5-mini-shape"
    seq_len = args.seq_len or (256 if smoke else 2048)
    batch = args.batch_size or (2 if smoke else 4)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    steps = args.steps or (3 if smoke else 35)
    samples = args.samples or (32 if smoke else 512)
    profile = set(runs if args.profile == "all" else (args.profile or "").split(",")) - {""}
    memory_trace = set(args.memory_trace.split(",")) - {""}
    if memory_trace and smoke:
        ap.error("--memory-trace reads the CUDA allocator: not with --smoke")
    mode = ("qlora" if args.qlora else "lora") + ("-warm" if args.cache == "warm" else "") + \
        (f"-{args.tag}" if args.tag else "")
    peak = args.peak_tflops or PEAK_TFLOPS.get(slug)

    sys.path.insert(0, HERE)
    import think_data

    workdir = tempfile.mkdtemp(prefix="train-compare-")
    out_dir = workdir if smoke and not args.results_dir else os.path.abspath(args.results_dir or RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(workdir, "think.jsonl")
    think_data.write(data, samples=samples, seed=0, median=120 if smoke else 500)
    flags = sorted(gradflow_flags()) if any(r.startswith("a") for r in runs) else []
    print(f"train_compare: {mode} on {full_name}, runs {', '.join(runs)}; {samples} samples in {data}; "
          f"logs in {workdir}", flush=True)
    configs = [Config(run=run, preset=preset, device="cpu" if smoke else "cuda",
                      dtype="float32" if smoke else "bfloat16", bf16=not smoke,
                      quant="4bit" if args.qlora else "none", seq_len=seq_len, batch_size=batch, warmup=warmup,
                      steps=steps, profile=run in profile, data=data, workdir=workdir,
                      result=os.path.join(workdir, f"result-{run}.json"), loss_on=args.loss_on, lr=2e-4,
                      attn_packed="sdpa" if smoke else "flex_attention", gradflow_flags=flags,
                      profile_out=os.path.join(out_dir,
                                               f"train_compare_profile_{mode}_{run}_{slug}.txt"),
                      memory_trace=run in memory_trace, cache=args.cache,
                      memory_trace_out=os.path.join(out_dir, f"train_compare_memory_{mode}_{run}_{slug}.txt"))
               for run in runs]
    # on the GPU one run at a time (each peak and each timing its own); --smoke on CPU measures neither: in parallel
    jobs = args.jobs or (len(runs) if smoke else 1)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {c.run: pool.submit(run_worker, c, args.timeout, os.path.join(workdir, f"log-{c.run}.txt"),
                                     1 if smoke else None)
                   for c in configs}
        results = {}
        for run, future in futures.items():
            r = results[run] = future.result()
            tps = r.get("tokens_per_second")
            print(f"  {run:5s} {r['title']}: " + (
                f"{tps:,.0f} real tok/s, peak {_gib(r.get('peak_allocated'))} GiB (training "
                f"{_gib((r.get('peak_train') or [None])[0])}, before it {_gib((r.get('peak_setup') or [None])[0])}) "
                f"(step 1 at {_secs(_first_step(r))} s, whole run {r['worker_wall_s']} s)" if tps
                else f"FAILED rc={r['worker_rc']}: {(r.get('error') or '')[:200]} (log {workdir}/log-{run}.txt)"),
                flush=True)
    path = os.path.join(out_dir, f"train_compare_{slug}.json")
    # the other mode's results, from an earlier command: in --results-dir, else the committed file
    earlier = next((p for p in (path, os.path.join(RESULTS, os.path.basename(path))) if os.path.exists(p)), None)
    doc = json.load(open(earlier)) if earlier and not smoke else {}
    results = _merged(results, doc.get("modes", {}).get(mode, {}))
    n_params = model_params(preset)
    summarize(results, n_params, peak)
    loss = loss_agreement(results, "a" if "a" in results else runs[0])
    for name, verdict in loss.get("runs", {}).items():
        print(f"  loss {name} vs {loss['reference']}: {'agrees' if verdict['agree'] else 'DIFFERS'} "
              f"{[w.get('diff') for w in verdict['windows']]}")

    doc.update({"device": full_name, "commit": commit(), "date": time.strftime("%Y-%m-%d"), "versions": versions,
                "peak_tflops": peak, "command": "python bench/train_compare.py " + " ".join(sys.argv[1:])})
    doc.setdefault("modes", {})[mode] = {
        "model": preset, "n_params": n_params, "dtype": "float32" if smoke else "bfloat16", "samples": samples,
        "seq_len": seq_len, "batch_size": batch, "warmup": warmup, "steps": steps, "loss_on": args.loss_on,
        "cache": args.cache,
        "results": results, "loss": loss, "commit": doc["commit"], "date": doc["date"], "versions": versions,
        "mfu_definition": "tokens/s x (4 + 2 x checkpointed share) x N / peak (SPEC §9; attention FLOPs not "
                          "counted)"}
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    table = markdown(doc, mode)
    print(table)
    with open(os.path.join(out_dir, f"train_compare_{slug}_{mode}.md"), "w") as fh:
        fh.write(table)
    if not smoke and not args.no_docs:
        write_docs(table, f"{slug}:{mode}")
    print(f"results: {path}")
    return 0 if all(r.get("tokens_per_second") for r in results.values()) else 1


# ----- the worker: one run in its own process -----------------------------------------------------------------
class Meter:
    """Real tokens per collated batch, the loss of every step, and the clock around the counted steps."""

    def __init__(self, cfg: Config, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id
        self.tokens: list[int] = []  # real tokens of each batch the collator built, in order (= step order)
        self.supervised: list[int] = []
        self.losses: list = []  # per step, tensors until the end (no sync per step)
        self.t0 = self.t1 = None
        self.model_info: dict = {}
        self.prof = None
        self.peak_before_reset = [0, 0]  # allocated, reserved: the highest peaks read before a reset_peak_memory_stats
        self.setup_peak = None  # [allocated, reserved] before the first step: model build, pre-flight, plan
        self.trace_baseline = None
        self.memory_trace = None
        self.process_start = None  # time.time() of the worker process's start (gradflow.training.startup)
        self.marks: list = []  # (stage, time.time() when it ended), in order: the startup breakdown
        self.train_called = self.first_step_at = None

    def mark(self, stage: str) -> None:
        self.marks.append((stage, time.time()))

    def startup(self) -> dict:
        """Seconds from the process start to the end of step 1, and each stage's share (consecutive marks)."""
        if self.process_start is None:
            return {}
        points = [("start", self.process_start), *self.marks]
        if self.train_called is not None:
            points.append(("trainer_setup", self.train_called))
        if self.first_step_at is not None:
            points.append(("train_to_first_step", self.first_step_at))
        stages = {name: round(t - prev, 2) for (_, prev), (name, t) in zip(points, points[1:])}
        total = round(self.first_step_at - self.process_start, 2) if self.first_step_at is not None else None
        return {"time_to_first_step_s": total, "stages": stages}

    def count(self, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # padding-free / packed batches have no mask; the pad token never occurs in the data (a special token)
        real = int(mask.sum()) if mask is not None else int((ids != self.pad_id).sum())
        self.tokens.append(real)
        labels = batch.get("labels")
        self.supervised.append(int((labels[..., 1:] != -100).sum()) if labels is not None else 0)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()  # the clock reads what the GPU has finished, not what was queued


def instrument(meter: Meter) -> None:
    """Patch transformers.Trainer (and so every subclass: gradflow's, TRL's) to count tokens, losses and time."""
    import torch
    from transformers import Trainer, TrainerCallback

    cfg = meter.cfg
    first, last = cfg.warmup, cfg.warmup + cfg.steps

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, rows):
            batch = self.inner(rows)
            meter.count(batch)
            return batch

        def __getattr__(self, name):
            return getattr(self.inner, name)

    trace_step = _total_steps(cfg)  # the last step, when --memory-trace added it

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cfg.device == "cuda" and state.global_step == 0 and meter.setup_peak is None:
                meter.setup_peak = _peaks(meter)  # model build, pre-flight and plan: their peak apart from training
                torch.cuda.reset_peak_memory_stats()
                meter.peak_before_reset = [0, 0]
            if cfg.memory_trace and state.global_step == trace_step - 1 and meter.trace_baseline is None:
                import memory_trace

                meter.trace_baseline = memory_trace.start()
            if cfg.profile and state.global_step == last and meter.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if cfg.device == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                meter.prof = torch.profiler.profile(activities=acts)
                meter.prof.start()

        def on_step_end(self, args, state, control, **kw):
            if meter.first_step_at is None:  # the first optimizer step: the startup ends here
                _sync(cfg.device)
                meter.first_step_at = time.time()
            if state.global_step == first:
                _sync(cfg.device)
                meter.t0 = time.perf_counter()
            elif state.global_step == last:
                _sync(cfg.device)
                meter.t1 = time.perf_counter()
            elif meter.prof is not None and state.global_step == last + 3:
                _sync(cfg.device)
                meter.prof.stop()
            if meter.trace_baseline is not None and state.global_step == trace_step and meter.memory_trace is None:
                import memory_trace

                meter.memory_trace = memory_trace.stop(cfg.memory_trace_out, meter.trace_baseline,
                                                       f"run {cfg.run} ({RUNS[cfg.run]}), step {trace_step}")
                meter.memory_trace["path"] = _rel(cfg.memory_trace_out)

        def on_train_end(self, args, state, control, model=None, **kw):
            meter.model_info.update(_model_info(model))

    get_loader = Trainer.get_train_dataloader

    def get_train_dataloader(self, *a, **k):
        if not isinstance(self.data_collator, Counting):
            self.data_collator = Counting(self.data_collator)
        return get_loader(self, *a, **k)

    train = Trainer.train

    def train_(self, *a, **k):
        if meter.train_called is None:
            meter.train_called = time.time()
        self.add_callback(Clock())
        out = train(self, *a, **k)
        if hasattr(self, "gradflow_ce"):  # gradflow's Trainer: which cross-entropy it asked for, and whether it applied
            from gradflow.training.loss import unsupported_reason

            why = unsupported_reason(self.model) if self.gradflow_ce == "chunked" else None
            meter.model_info.update(ce=self.gradflow_ce, ce_fallback=why)
        return out

    step = Trainer.training_step

    def training_step(self, *a, **k):
        loss = step(self, *a, **k)
        meter.losses.append(loss.detach())
        return loss

    Trainer.get_train_dataloader, Trainer.train, Trainer.training_step = get_train_dataloader, train_, training_step


def _model_info(model) -> dict:
    """Which attention ran and what share of the decoder layers was checkpointed."""
    if model is None:
        return {}
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    on = [bool(getattr(m, "gradient_checkpointing", False)) for m in layers]
    config = getattr(model, "config", None)
    return {"attention": getattr(config, "_attn_implementation", None), "decoder_layers": len(layers),
            "checkpointed_layers": sum(on), "checkpointed_share": sum(on) / len(on) if on else None}


def worker(cfg_path: str) -> int:
    import traceback

    with open(cfg_path) as fh:
        cfg = Config(**json.load(fh))
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from gradflow.training.startup import process_started  # imports nothing heavy: unsloth must come first

    started = process_started()
    import peers

    try:
        peers.import_first(cfg.run)  # unsloth patches transformers: before anything imports it
    except BaseException as exc:  # the peer cannot run here: why, exactly, beside the other runs
        traceback.print_exc()
        with open(cfg.result, "w") as fh:
            json.dump({"error": f"{type(exc).__name__}: {exc}", "note": peers.wheels_note()}, fh)
        return 1
    import compare_factory

    tok = compare_factory.tokenizer()
    meter = Meter(cfg, tok.pad_token_id)
    meter.process_start = started
    result: dict = {}
    try:
        import torch

        torch.manual_seed(0)
        if cfg.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            _keep_peaks_across_resets(meter)
        instrument(meter)
        t_start = time.perf_counter()
        meter.mark("imports")  # torch, transformers, the tokenizer, this script
        if cfg.run.startswith("a"):
            result.update(_run_gradflow(cfg))
        elif cfg.run == "b":
            _run_seed_style(cfg, tok, compare_factory, meter.mark)
        elif cfg.run in peers.RUNNERS:
            peers.RUNNERS[cfg.run](cfg, tok, compare_factory, _common_args(cfg), meter.mark)
        else:
            _run_trl(cfg, tok, compare_factory, meter.mark, packed=cfg.run == "d")
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        result.update(_measure(cfg, meter))
    except BaseException as exc:  # the parent reports it beside the other runs
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            result.update(_measure(cfg, meter))
        else:
            result["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            result.update(_measure(cfg, meter, partial=True))
    with open(cfg.result, "w") as fh:
        json.dump(result, fh)
    return 0 if "error" not in result else 1


def _measure(cfg: Config, meter: Meter, partial: bool = False) -> dict:
    import torch

    first, last = cfg.warmup, cfg.warmup + cfg.steps
    out = {"tokens_per_step": meter.tokens[: len(meter.losses)], "supervised_per_step":
           meter.supervised[: len(meter.losses)], "losses": [float(x) for x in meter.losses], **meter.model_info,
           "startup": meter.startup()}
    if meter.t0 is not None and meter.t1 is not None and len(meter.tokens) >= last:
        counted = sum(meter.tokens[first:last])
        seconds = meter.t1 - meter.t0
        out.update({"counted_steps": [first + 1, last], "counted_tokens": counted, "counted_seconds": round(seconds, 3),
                    "tokens_per_second": round(counted / seconds, 1),
                    "tokens_per_step_mean": round(counted / cfg.steps, 1)})
    elif not partial:
        out["error"] = (f"the run did not reach step {last} (steps logged: {len(meter.losses)}, batches: "
                        f"{len(meter.tokens)})")
    if cfg.device == "cuda":
        train = _peaks(meter)
        setup = meter.setup_peak or [0, 0]
        # the whole process's peak: training's, or the setup's (model build, gradflow's pre-flight and plan)
        out["peak_allocated"], out["peak_reserved"] = max(train[0], setup[0]), max(train[1], setup[1])
        out["peak_train"], out["peak_setup"] = train, setup
    if meter.memory_trace is not None:
        out["memory_trace"] = meter.memory_trace
    if meter.prof is not None:
        out["profile"] = _write_profile(meter.prof, cfg)
    return out


def _peaks(meter: Meter) -> list:
    import torch

    return [max(meter.peak_before_reset[0], torch.cuda.max_memory_allocated()),
            max(meter.peak_before_reset[1], torch.cuda.max_memory_reserved())]


def _keep_peaks_across_resets(meter: Meter) -> None:
    """gradflow's memory plan resets the allocator's peak to measure its probe steps: keep what it would erase."""
    import torch

    reset = torch.cuda.reset_peak_memory_stats

    def keeping(*a, **k):
        meter.peak_before_reset = _peaks(meter)
        return reset(*a, **k)

    torch.cuda.reset_peak_memory_stats = keeping


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


def _write_profile(prof, cfg: Config) -> str:
    averages = prof.key_averages()
    table = None
    keys = ("self_device_time_total", "self_cuda_time_total") if cfg.device == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            table = averages.table(sort_by=key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    os.makedirs(os.path.dirname(cfg.profile_out), exist_ok=True)
    with open(cfg.profile_out, "w") as fh:
        fh.write(f"# torch.profiler: run {cfg.run} ({RUNS[cfg.run]}), steps {cfg.warmup + cfg.steps + 1}-"
                 f"{cfg.warmup + cfg.steps + 3} (after the counted ones), top ops by self "
                 f"{'CUDA' if cfg.device == 'cuda' else 'CPU'} time\n{table}\n")
    return _rel(cfg.profile_out)


def _total_steps(cfg: Config) -> int:
    return cfg.warmup + cfg.steps + (3 if cfg.profile else 0) + (1 if cfg.memory_trace else 0)


def _run_gradflow(cfg: Config) -> dict:
    """`gradflow train` through its console entry point, in this process (so the instrumentation sees it)."""
    flags = set(cfg.gradflow_flags)
    total = _total_steps(cfg)
    out = os.path.join(cfg.workdir, f"gradflow-{cfg.run}")
    argv = [cfg.preset, "--data", cfg.data, "--output", out, "--overwrite", "--lora-r", "16", "--lora-alpha", "32",
            "--lora-targets", "all-linear", "--dtype", cfg.dtype, "--precision", "bf16" if cfg.bf16 else "fp32",
            "--device", cfg.device, "--seq-len", str(cfg.seq_len), "--batch-size", str(cfg.batch_size),
            "--max-steps", str(total), "--seed", "0", "--loss-on", cfg.loss_on, "--lr", str(cfg.lr),
            "--save-steps", str(total + 1)]
    if cfg.quant != "none":
        argv += ["--quant", cfg.quant]
    if cfg.run in ("a-gc", "a-gc-eager"):
        argv += ["--gc", "non-reentrant"]
        argv += ["--gc-every", "1"] if "--gc-every" in flags else []
    if cfg.run == "a-ce":
        if "--ce" not in flags:
            raise RuntimeError("this gradflow has no --ce option")
        argv += ["--ce", "standard"]
    if cfg.run in ("a-eager", "a-gc-eager"):
        if "--compile" not in flags:
            raise RuntimeError("this gradflow has no --compile option")
        argv += ["--compile", "off"]
    print("$ gradflow train " + " ".join(argv), flush=True)
    sys.argv = ["gradflow", "train", *argv]
    from gradflow.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"gradflow train exited {exc.code}") from None
    info = {"argv": "gradflow train " + " ".join(argv)}
    try:
        with open(os.path.join(out, "report.json")) as fh:
            report = json.load(fh)
        plan = report.get("plan") or {}
        info["plan"] = {k: plan.get(k) for k in ("gc_every", "checkpointed", "layers", "tokens_per_batch", "why",
                                                 "expected_peak") if k in plan}
        info["gradflow_tokens"] = (report.get("train") or {}).get("tokens")
        info["gradflow_status"] = (report.get("train") or {}).get("status")
        info["compiled"] = bool(((report.get("train") or {}).get("compile") or {}).get("compiled"))
        info["gradflow_startup"] = (report.get("train") or {}).get("startup")
    except (OSError, ValueError):
        pass
    return info


def _rows_seed_style(cfg: Config, tok):
    """Every sample tokenised with the chat template, truncated and padded to --seq-len (the seed's way)."""
    import torch

    rows = []
    with open(cfg.data) as fh:
        records = [json.loads(line) for line in fh]
    for rec in records:
        enc = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=cfg.loss_on == "completion")
        ids = list(enc["input_ids"])[: cfg.seq_len]
        keep = list(enc["assistant_masks"])[: cfg.seq_len] if cfg.loss_on == "completion" else [1] * len(ids)
        pad = cfg.seq_len - len(ids)
        rows.append({"input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                     "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                     "labels": torch.tensor([t if k else -100 for t, k in zip(ids, keep)] + [-100] * pad)})
    return rows


def _common_args(cfg: Config) -> dict:
    return dict(output_dir=os.path.join(cfg.workdir, f"out-{cfg.run}"), per_device_train_batch_size=cfg.batch_size,
                max_steps=_total_steps(cfg), learning_rate=cfg.lr, lr_scheduler_type="linear", bf16=cfg.bf16,
                report_to=[], save_strategy="no", logging_steps=10, seed=0, use_cpu=cfg.device == "cpu",
                dataloader_num_workers=0, disable_tqdm=True)


def _run_seed_style(cfg: Config, tok, factory, mark) -> None:
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = factory.lora(factory.base_model(cfg.preset, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant))
    model.enable_input_require_grads()  # the hook reentrant checkpointing needs with frozen embeddings
    mark("model")
    args = TrainingArguments(**_common_args(cfg), gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": True}, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_rows_seed_style(cfg, tok),
                      data_collator=default_data_collator)
    mark("data_and_trainer")
    trainer.train()


def _run_trl(cfg: Config, tok, factory, mark, *, packed: bool) -> None:
    import dataclasses as dc

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    attn = cfg.attn_packed if packed else "sdpa"
    model = factory.lora(factory.base_model(cfg.preset, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant,
                                            attn=attn))
    mark("model")
    with open(cfg.data) as fh:
        data = Dataset.from_list([{"messages": json.loads(line)["messages"]} for line in fh])
    fields = {f.name for f in dc.fields(SFTConfig)}
    kwargs = {**_common_args(cfg), "max_length": cfg.seq_len, "assistant_only_loss": cfg.loss_on == "completion"}
    if packed:
        kwargs.update(packing=True, packing_strategy="bfd", padding_free=True)
    dropped = sorted(k for k in kwargs if k not in fields)
    if dropped:
        print(f"train_compare: this TRL has no {', '.join(dropped)}", flush=True)
    trainer = SFTTrainer(model=model, args=SFTConfig(**{k: v for k, v in kwargs.items() if k in fields}),
                         train_dataset=data, processing_class=tok)
    mark("data_and_trainer")  # SFTTrainer tokenises (and packs) the dataset in its constructor
    trainer.train()


if __name__ == "__main__":
    sys.exit(main())
