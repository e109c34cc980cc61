"""Behaviour held still: the JSON of the main commands, recorded per stack, compared after every change.

`GOLDEN_UPDATE=1 pytest tests/golden` rewrites the recorded files (do it only for a change of behaviour that you
mean, and say so in the commit). Timings, versions and temporary paths are masked; floats compared at 5 digits.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from tests.helpers.cli import invoke
from tests.helpers.env import stack

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FACTORY = HERE / "factories.py"
DATA = REPO / "gradflow" / "data" / "think_demo.jsonl"

# keys whose values are clocks, sizes of this machine or versions: not behaviour
_MASKED = re.compile(r"(^|_)(s|seconds|secs|time|wall|elapsed|started|finished|date|timestamp|created|version|"
                     r"tokens_per_s|tokens_per_second|samples_per_second|steps_per_second|rss|rss_mib|peak_rss|"
                     r"memory_available|budget|pid|host|hostname)$")


def _mask(value, tmp: str):
    if isinstance(value, dict):
        return {k: ("<masked>" if _MASKED.search(k) else _mask(v, tmp)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, tmp) for v in value]
    if isinstance(value, float):
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.5g}")
    if isinstance(value, str):
        return value.replace(tmp, "<TMP>").replace(str(REPO), "<REPO>")
    return value


def _llama_config(tmp_path: Path) -> Path:
    """A 7B-shaped Llama config.json, written locally: the dry run's input."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    path = tmp_path / "llama7b"
    config.save_pretrained(str(path))
    return path / "config.json"


def _train(tmp_path: Path):
    out = tmp_path / "run"
    run = invoke("train", "tiny-phi3", "--data", str(DATA), "--output", str(out), "--max-steps", "3",
                 "--seq-len", "96", "--seed", "0", "--overwrite")
    return run, json.loads((out / "report.json").read_text())


CASES = {
    "demo_probe": ("probe-backward", "gradflow.demos:seed_bug", "--format", "json"),
    "demo_patch": ("patch", "gradflow.demos:seed_bug", "--format", "json"),
    "inspect_tiny_llama": ("inspect", "tiny-llama", "--format", "json"),
    "probe_tiny_llama": ("probe-backward", "tiny-llama", "--format", "json"),
    "inspect_tiny_phi3": ("inspect", "tiny-phi3", "--gc", "reentrant", "--format", "json"),
    "probe_tiny_phi3_4bit": ("probe-backward", "tiny-phi3", "--quant", "4bit", "--gc", "reentrant", "--format",
                             "json"),
    "inspect_trainer": ("inspect", f"{FACTORY}:trainer", "--format", "json"),
    "probe_trainer": ("probe-backward", f"{FACTORY}:trainer", "--format", "json"),
    "dry_run_7b": ("probe-backward", "{config}", "--dry-run", "--lora-r", "16", "--lora-targets", "all-linear",
                   "--gc", "reentrant", "--format", "json"),
    "train_3_steps": None,
}


def _run(name: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GOLDEN_OUT", str(tmp_path / "trainer-out"))
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "cache"))  # train's data cache: a miss every time
    if CASES[name] is None:
        run, data = _train(tmp_path)
    else:
        config = str(_llama_config(tmp_path)) if name == "dry_run_7b" else ""
        run = invoke(*(a.replace("{config}", config) for a in CASES[name]))
        data = run.json()
    assert run.code in (0, 1), (run.code, run.stderr[-2000:])
    return _mask(data | {"exit_code": run.code}, str(tmp_path))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("train_3_steps",
                                                                                      "probe_trainer",
                                                                                      "inspect_trainer")
                                  else n for n in CASES])
def test_same_json_as_recorded(name, tmp_path, monkeypatch):
    got = _run(name, tmp_path, monkeypatch)
    path = HERE / stack() / f"{name}.json"
    if os.environ.get("GOLDEN_UPDATE") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got == want, f"{name}: the JSON changed; if you meant it, rerun with GOLDEN_UPDATE=1 and say why"
