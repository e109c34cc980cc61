"""`probe-backward --ddp|--fsdp` under torchrun on CPU (gloo, 2 processes), against a single-process probe.

Every rank probes the same batch (the one --seed makes), so DDP averages identical gradients and FSDP2 reduce-scatters
them: the report gathered on rank 0 must equal a single-process probe of the same setup, parameter by parameter.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers.cli import gradflow, invoke_main
from tests.helpers.dist import process_group, torchrun  # noqa: F401  (process_group: a fixture)
from tests.helpers.env import child_env

SETUP = ["--format", "json", "--detail", "params", "--seq-len", "16"]

DDP_FACTORY = '''
import torch.distributed as dist

from gradflow.setup.presets import build_preset


def build():
    model = build_preset("tiny-llama")
    if dist.is_available() and dist.is_initialized():  # under torchrun: the user wraps it themselves
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    return model
'''


FSDP1_FACTORY = '''
import torch
import torch.distributed as dist

from gradflow.setup.presets import build_preset
from gradflow.setup.build import apply_lora


def build():
    model = apply_lora(build_preset("tiny-llama", training=True), 8, 16, "all-linear")  # = probe-backward tiny-llama
    if dist.is_available() and dist.is_initialized():  # under torchrun: the user wraps it in FSDP1 themselves
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer = type(model.get_base_model().model.layers[0])
        model = FullyShardedDataParallel(model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({layer}),
                                         device_id=torch.device("cpu"))
    return model
'''


def _single(*args):
    # a process of its own, with one intra-op thread like each torchrun rank: the same kernels in both runs
    res = gradflow("probe-backward", *args, *SETUP, timeout=120)
    assert res.code == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _torchrun(*args):
    res = subprocess.run(torchrun("-m", "gradflow", "probe-backward", *args, *SETUP), capture_output=True, text=True,
                         timeout=180, env=child_env())
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


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp1"])
def test_gathered_report_equals_single_process(wrapper, single_llama, tmp_path):
    if wrapper == "fsdp1":  # a factory that wraps tiny-llama + the same LoRA in FSDP1 (use_orig_params) itself
        factory = tmp_path / "fsdp1_factory.py"
        factory.write_text(FSDP1_FACTORY)
        gathered = _torchrun(f"{factory}:build", "--fsdp")
        assert not any("_fsdp_wrapped_module" in r["name"] for r in gathered["params"]["per_param"])
    else:
        gathered = _torchrun("tiny-llama", f"--{wrapper}")
    _assert_same(gathered, single_llama)
    assert gathered["distributed"] == {"wrapper": wrapper, "world_size": 2, "backend": "gloo",
                                       "batch": "the same on every rank", "ranks_disagree": [],
                                       "ranks_disagree_count": 0}
    assert {r["grad"] for r in gathered["params"]["per_param"]} == {"ok", "zero"}  # LoRA: B gets a gradient, A zero


@pytest.mark.slow
def test_factory_that_wraps_in_ddp_itself(tmp_path):
    factory = tmp_path / "ddp_factory.py"
    factory.write_text(DDP_FACTORY)
    spec = f"{factory}:build"
    gathered = _torchrun(spec, "--ddp")
    _assert_same(gathered, _single(spec))
    assert gathered["model"]["class"] == "LlamaForCausalLM"  # the unwrapped model, not DistributedDataParallel
    assert not any(r["name"].startswith("module.") for r in gathered["params"]["per_param"])


TRAINER_FACTORY = '''
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow.setup.presets import build_preset, build_tokenizer
from gradflow.setup.build import apply_lora


def build():
    tok = build_tokenizer()
    rows = Dataset.from_dict({"text": [f"sample {i} says hello to the world" for i in range(8)]})
    rows = rows.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=OUT, per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    model = apply_lora(build_preset("tiny-llama"), 4, 8, "all-linear")
    model.base_model.model.model.layers[1].self_attn.o_proj.base_layer.weight.requires_grad_(True)  # a mix
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
'''


@pytest.mark.slow
def test_a_trainer_factory_under_torchrun_speaks_once_for_every_rank(tmp_path):
    """No --ddp/--fsdp: the Trainer starts the process group itself; each rank probes its own first batch, the
    findings of both are merged and rank 0 alone prints them."""
    factory = tmp_path / "trainer_factory.py"
    factory.write_text(TRAINER_FACTORY.replace("OUT", repr(str(tmp_path / "out"))))
    res = subprocess.run(torchrun("-m", "gradflow", "probe-backward", f"{factory}:build", "--format", "json",
                                  "--fail-on", "never"), capture_output=True, text=True, timeout=180, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"schema_version"') == 1  # rank 1 printed nothing
    report = json.loads(res.stdout)
    info = report["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo" and info["findings_on_some_ranks"] == []
    slugs = [f["slug"] for f in report["findings"]]
    assert len(slugs) == len(set(slugs)) and slugs  # both ranks' findings, each once
    single = gradflow("probe-backward", f"{factory}:build", "--format", "json", "--fail-on", "never", timeout=120)
    assert single.code == 0, single.stderr[-3000:]
    assert sorted(slugs) == sorted(f["slug"] for f in json.loads(single.stdout)["findings"])


@pytest.mark.parametrize("extra,message", [
    ([], "--ddp needs the process group that torchrun sets up"),
    (["--steps", "2"], "--ddp cannot be combined with --steps"),
])
def test_bad_usage_is_one_line_exit_2(extra, message):
    res = invoke_main("probe-backward", "tiny-llama", "--ddp", *extra)
    assert res.code == 2
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


# --- FSDP1 on one gloo rank, in process: names, numels and states as the unwrapped model's ---------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
                                           for _ in range(2)])
        self.spare = torch.nn.Linear(6, 6)  # trainable, never called
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x).pow(2).mean()


def _fsdp1_setup(model, **options):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from gradflow.world import Launch
    from gradflow.setup.sources import Setup

    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Sequential}),
                                       device_id=torch.device("cpu"), **options)
    setup = Setup(model=wrapped, kind="factory", source="net.py:build", loss_fn=lambda m, x: m(x))
    return setup, Launch("fsdp", 0, 1, 0, "gloo", "cpu")


@pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning", "ignore:FSDP is switching to use `NO_SHARD`:UserWarning")
def test_fsdp1_probe_reads_as_the_unwrapped_model(process_group):
    import copy

    import gradflow
    from gradflow import distributed

    torch.manual_seed(0)
    net = _Net()
    plain = copy.deepcopy(net)
    batch = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    setup, launch = _fsdp1_setup(net, use_orig_params=True)
    distributed.adopt(setup, launch)
    assert setup.model is net and launch.wrapped is not None
    got = distributed.probe(setup, batch, launch)
    ref = gradflow.probe(plain, batch, loss_fn=lambda m, x: m(x))

    rows = [(p.name, p.module, p.numel, p.grad) for p in got.snapshot.params]
    assert rows == [(p.name, p.module, p.numel, p.grad) for p in ref.snapshot.params]
    assert dict((p.name, p.grad) for p in got.snapshot.params)["spare.weight"] == "none"  # FSDP1 zero-filled it
    norms = [p.grad_norm if p.grad_norm is not None else -1.0 for p in got.snapshot.params]
    expected = [p.grad_norm if p.grad_norm is not None else -1.0 for p in ref.snapshot.params]
    torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    keys = ("name", "cls", "depth", "trainable", "frozen", "ran", "order", "grads")
    assert [tuple(getattr(m, k) for k in keys) for m in got.snapshot.modules] == \
        [tuple(getattr(m, k) for k in keys) for m in ref.snapshot.modules]
    assert [f.slug for f in got.findings] == [f.slug for f in ref.findings]
    assert [(u.module, u.kind, u.use_orig_params, u.planned) for u in got.snapshot.wrappers] == \
        [("", "fsdp1", True, False), ("blocks.0", "fsdp1", True, False), ("blocks.1", "fsdp1", True, False)]
    assert got.extra["distributed"]["wrapper"] == "fsdp1"


@pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning", "ignore:FSDP is switching to use `NO_SHARD`:UserWarning")
@pytest.mark.parametrize("per_block", [False, True], ids=["one-unit", "a-unit-per-block"])
def test_fsdp1_under_torchrun_names_a_detached_branch(per_block, process_group):
    """The torchrun path (distributed.probe) on a factory's FSDP1 model places a cut as a single process does:
    FSDP1 zero-fills the flat gradient of the parameters the loss never reached, and only the replay can tell those
    zeros apart from lora_A's at step 0."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from gradflow import distributed
    from gradflow.setup.sources import Setup
    from gradflow.world import Launch
    from tests.helpers.builders import Block, DetachedBranch, assert_fires, custom_with, tiny_batch

    torch.manual_seed(0)
    policy = {"auto_wrap_policy": ModuleWrapPolicy({Block})} if per_block else {}
    wrapped = FullyShardedDataParallel(custom_with(DetachedBranch), use_orig_params=True,
                                       device_id=torch.device("cpu"), **policy)
    setup = Setup(model=wrapped, kind="factory", source="net.py:build", loss_fn=lambda m, b: m(**b)["loss"])
    launch = Launch("fsdp", 0, 1, 0, "gloo", "cpu")
    distributed.adopt(setup, launch)
    report = distributed.probe(setup, tiny_batch(), launch)
    assert "grad-missing-unexplained" not in report.slugs()
    finding = assert_fires(report, "graph-break")
    assert finding.location == "base_model.model.blocks.1"
    assert finding.params == ["base_model.model.blocks.1.proj.lora_A.default.weight",
                              "base_model.model.blocks.1.proj.lora_B.default.weight"]
    assert report.snapshot.model_class == "PeftModel"
    assert report.extra["distributed"]["wrapper"] == "fsdp1"


@pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning", "ignore:FSDP is switching to use `NO_SHARD`:UserWarning")
def test_fsdp1_without_use_orig_params_is_refused(process_group):
    from gradflow import distributed
    from gradflow.errors import GradflowError

    setup, launch = _fsdp1_setup(_Net(), use_orig_params=False)
    with pytest.raises(GradflowError, match="use_orig_params=False") as err:
        distributed.adopt(setup, launch)
    assert "use_orig_params=True" in err.value.todo


@pytest.mark.slow
def test_the_text_report_says_it_ran_distributed():
    res = subprocess.run(torchrun("-m", "gradflow", "probe-backward", "tiny-llama", "--fsdp", "--seq-len", "16"),
                         capture_output=True, text=True, timeout=180, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distributed: FSDP2 on 2 ranks (gloo)  batch: the same on every rank" in res.stdout.splitlines()
    assert res.stdout.count(" trainable / ") == 1  # rank 0's report alone


# --- the replay, decided by all ranks together (a rank that replays alone leaves the wrapper's collectives unmatched)
NARROW_IDS_FACTORY = '''
import torch
from gradflow.setup.presets import build_preset


def build():  # a full fine-tune: the embedding's rows are sharded, and the batch reaches only some ranks' rows
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"model": build_preset("tiny-llama", seed=0, training=True),
            "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}}
'''

DETACHED_FSDP1_FACTORY = '''
import torch
import torch.distributed as dist
from tests.helpers.builders import DetachedBranch, custom_with, tiny_batch


def build():
    torch.manual_seed(0)
    model = custom_with(DetachedBranch)
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    return {"model": model, "batch": tiny_batch(), "loss_fn": lambda m, b: m(**b)["loss"]}
'''


@pytest.mark.slow
def test_a_zero_gradient_on_one_ranks_shard_does_not_split_the_ranks(tmp_path):
    """FSDP2 shards the embedding's gradient by rows; a rank whose rows the batch never reaches sees a zero shard.
    Replayed on that rank alone, the forward's all-gathers had no partner (gloo aborted): now it is healthy."""
    (tmp_path / "narrow.py").write_text(NARROW_IDS_FACTORY)
    gathered = _torchrun(f"{tmp_path / 'narrow.py'}:build", "--fsdp")
    assert gathered["findings"] == [] and gathered["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_a_detached_branch_under_two_fsdp1_ranks_is_a_graph_break(tmp_path):
    (tmp_path / "detached.py").write_text(DETACHED_FSDP1_FACTORY)
    res = subprocess.run(torchrun("-m", "gradflow", "probe-backward", f"{tmp_path / 'detached.py'}:build", "--fsdp",
                                  "--format", "json"), capture_output=True, text=True, timeout=180,
                         env=child_env())
    assert res.stdout.count('"schema_version"') == 1, res.stderr[-3000:]
    findings = json.loads(res.stdout)["findings"]
    assert [(f["slug"], f["location"]) for f in findings][0] == ("graph-break", "base_model.model.blocks.1")
    assert "grad-missing-unexplained" not in [f["slug"] for f in findings]
