"""`probe-backward --ddp|--fsdp` under torchrun on CPU (gloo, 2 processes), against a single-process probe.

Every rank probes the same batch (the one --seed makes), so DDP averages identical gradients and FSDP2 reduce-scatters
them: the report gathered on rank 0 must equal a single-process probe of the same setup, parameter by parameter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

SETUP = ["--format", "json", "--detail", "params", "--seq-len", "16"]

DDP_FACTORY = '''
import torch.distributed as dist

from gradflow.presets import build_preset


def build():
    model = build_preset("tiny-llama")
    if dist.is_available() and dist.is_initialized():  # under torchrun: the user wraps it themselves
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    return model
'''


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # the same kernels in both runs, and 2 processes on a small machine
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(*args):
    res = subprocess.run([sys.executable, "-m", "gradflow", "probe-backward", *args, *SETUP],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _torchrun(*args):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "gradflow", "probe-backward", *args, *SETUP],
                         capture_output=True, text=True, timeout=180, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    # the whole of stdout is one JSON document: rank 1 printed nothing
    assert res.stdout.count('"schema_version"') == 1
    return json.loads(res.stdout)


def _assert_same(gathered, single):
    assert gathered["model"] == single["model"]
    floats = ("per_param", "per_layer")  # hold norms: compared below, at a tolerance
    counts = {k: v for k, v in gathered["params"].items() if k not in floats}
    assert counts == {k: v for k, v in single["params"].items() if k not in floats}
    layers, ref_layers = gathered["params"].get("per_layer", []), single["params"].get("per_layer", [])
    assert [(r["layer"], r["grads"]) for r in layers] == [(r["layer"], r["grads"]) for r in ref_layers]
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in layers], dtype=torch.float64),
                               torch.tensor([r["grad_norm"] for r in ref_layers], dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    assert [(f["slug"], f["severity"], f.get("location")) for f in gathered["findings"]] == \
        [(f["slug"], f["severity"], f.get("location")) for f in single["findings"]]
    rows, ref = gathered["params"]["per_param"], single["params"]["per_param"]
    assert [(r["name"], r["module"], r["numel"], r["grad"]) for r in rows] == \
        [(r["name"], r["module"], r["numel"], r["grad"]) for r in ref]
    assert len(rows) == single["params"]["trainable"] > 0
    norms = torch.tensor([r["grad_norm"] if r["grad_norm"] is not None else -1.0 for r in rows], dtype=torch.float64)
    expected = torch.tensor([r["grad_norm"] if r["grad_norm"] is not None else -1.0 for r in ref], dtype=torch.float64)
    # same batch, same weights; only the order of float32 sums differs (shards' norms are combined in float64)
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-7)
    assert [(m["name"], m["class"], m.get("grads"), m.get("ran")) for m in gathered["modules"]] == \
        [(m["name"], m["class"], m.get("grads"), m.get("ran")) for m in single["modules"]]
    assert gathered["loss"]["value"] == pytest.approx(single["loss"]["value"], rel=1e-6)


@pytest.fixture(scope="module")
def single_llama():
    return _single("tiny-llama")


@pytest.mark.parametrize("wrapper", ["--ddp", "--fsdp"])
def test_gathered_report_equals_single_process(wrapper, single_llama):
    gathered = _torchrun("tiny-llama", wrapper)
    _assert_same(gathered, single_llama)
    assert gathered["distributed"] == {"wrapper": wrapper[2:], "world_size": 2, "backend": "gloo",
                                       "batch": "the same on every rank", "ranks_disagree": [],
                                       "ranks_disagree_count": 0}
    assert {r["grad"] for r in gathered["params"]["per_param"]} == {"ok", "zero"}  # LoRA: B gets a gradient, A zero


def test_factory_that_wraps_in_ddp_itself(tmp_path):
    factory = tmp_path / "ddp_factory.py"
    factory.write_text(DDP_FACTORY)
    spec = f"{factory}:build"
    gathered = _torchrun(spec, "--ddp")
    _assert_same(gathered, _single(spec))
    assert gathered["model"]["class"] == "LlamaForCausalLM"  # the unwrapped model, not DistributedDataParallel
    assert not any(r["name"].startswith("module.") for r in gathered["params"]["per_param"])


@pytest.mark.parametrize("extra,message", [
    ([], "--ddp needs the process group that torchrun sets up"),
    (["--steps", "2"], "--ddp cannot be combined with --steps"),
])
def test_bad_usage_is_one_line_exit_2(extra, message):
    res = subprocess.run([sys.executable, "-m", "gradflow", "probe-backward", "tiny-llama", "--ddp", *extra],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr


def test_merge_combines_shards_and_lists_disagreeing_ranks():
    from gradflow.distributed import merge

    per_rank = [
        {"w": ("ok", 9.0, True), "z": ("zero", 0.0, True), "r": ("ok", 4.0, False), "u": ("ok", 1.0, False),
         "n": ("none", None, False), "x": ("ok", 1.0, True)},
        {"w": ("ok", 16.0, True), "z": ("zero", 0.0, True), "r": ("ok", 4.0, False), "u": ("none", None, False),
         "n": ("none", None, False), "x": ("nonfinite", None, True)},
    ]
    merged, disagree = merge(per_rank)
    assert merged["w"] == ("ok", 5.0)  # sqrt(9 + 16): the norm over both shards
    assert merged["z"] == ("zero", 0.0)
    assert merged["r"] == ("ok", 2.0)  # replicated (DDP): rank 0's norm, not summed
    assert merged["n"] == ("none", None)
    assert merged["x"][0] == "nonfinite"
    assert merged["u"] == ("ok", 1.0) and disagree == ["u"]  # a gradient on rank 0 only
