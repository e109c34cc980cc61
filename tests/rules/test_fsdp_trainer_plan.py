"""fsdp-mixed-requires-grad and fsdp-mixed-dtype for a Trainer whose TrainingArguments ask for FSDP1.

FSDP1 refuses a bad unit when it wraps, so gradflow plans the units from the Trainer's FSDP settings
(gradflow.setup.trainer_source.fsdp1_plan) and the rules judge the plan. transformers builds such a Trainer only in a
distributed launch, so the cases run under torchrun (2 gloo processes, tests/rules/_fsdp_trainer_run.py); on CPU
accelerate drops its FSDP plugin, and the run shows what FSDP1 itself raises when it wraps the same model as planned.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch.distributed as dist

from tests.helpers.dist import torchrun
from tests.helpers.env import child_env, stack

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
SCRIPT = os.path.join(os.path.dirname(__file__), "_fsdp_trainer_run.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: result} from one torchrun of _fsdp_trainer_run.py (2 processes): the tests that read it are slow."""
    out = tmp_path_factory.mktemp("fsdp_trainer") / "results.json"
    res = subprocess.run(torchrun(SCRIPT, out), capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def _slugs(result):
    return [(f["slug"], f["location"]) for f in result["findings"]]


# --- fires ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fires_for_the_root_unit_of_a_partly_frozen_model(runs):
    got = runs["frozen_embed"]
    assert not got["accelerate_fsdp"]  # on CPU accelerate dropped the plugin: the units are planned, not read
    assert _slugs(got) == [("fsdp-mixed-requires-grad", None)]  # None: the root unit
    assert got["findings"][0]["params"] == ["model.norm.weight", "lm_head.weight"]
    # the root plus each decoder layer named in transformer_layer_cls_to_wrap, as accelerate wraps them
    assert [u["module"] for u in got["units"]] == [""] + [f"model.layers.{i}" for i in range(4)]
    assert all(u["kind"] == "fsdp1" and u["planned"] and u["use_orig_params"] is False for u in got["units"])
    assert "uniform `requires_grad`" in got["wrap_error"]  # FSDP1 refuses that plan when it wraps


@pytest.mark.slow
def test_fires_for_lora_on_the_embeddings_under_peft_wrap_policy(runs):
    """The Trainer swaps in PEFT's wrap policy (Linear adapters as units of their own, on both stacks); the LoRA
    embedding's own parameters stay in the root unit beside frozen weights."""
    got = runs["lora_embed"]
    assert _slugs(got) == [("fsdp-mixed-requires-grad", None)]
    assert all("lora_embedding_" in p for p in got["findings"][0]["params"])
    assert any(u["module"].endswith("q_proj.lora_A.default") for u in got["units"])  # PEFT's policy, not accelerate's
    assert "uniform `requires_grad`" in got["wrap_error"]


@pytest.mark.slow
def test_fires_for_trl_sft_trainer_with_peft_config(runs):
    got = runs["sft_lora_embed"]
    assert _slugs(got) == [("fsdp-mixed-requires-grad", None)]
    assert all("lora_embedding_" in p for p in got["findings"][0]["params"])


@pytest.mark.slow
def test_mixed_dtype_fires_with_use_orig_params(runs):
    got = runs["fp32_head"]
    assert _slugs(got) == [("fsdp-mixed-dtype", None)]
    message = got["findings"][0]["message"]
    assert "bfloat16" in message and "float32 (lm_head.weight)" in message
    assert got["findings"][0]["params"] == ["lm_head.weight"]
    assert "uniform dtype" in got["wrap_error"]


# --- stays silent -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["frozen_embed_orig_params", "lora_linear", "sft_lora_linear", "all_bf16",
                                  "version_2"])
def test_silent(runs, case):
    got = runs[case]
    assert got["findings"] == []
    if case == "version_2":  # FSDP2: nothing to plan (fully_shard checks at the first forward, on the wrapped model)
        assert got["units"] == []
    else:
        assert got["units"] and all(u["planned"] for u in got["units"])


# --- how the args are read, without a launch (TrainingArguments alone accept fsdp) ------------------------------------
@pytest.fixture
def fsdp_env():
    """transformers 4.57's TrainingArguments write FSDP_* variables into os.environ: put them back afterwards."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"]:
        del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(saved)


def _args(tmp_path, **config):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, fsdp="full_shard auto_wrap",
                             fsdp_config={"sync_module_states": False, **config})


def test_fsdp1_options_from_training_arguments(tmp_path, fsdp_env):
    from gradflow.setup.trainer_source import fsdp1_options

    args = _args(tmp_path, fsdp_version=1, use_orig_params=False, transformer_layer_cls_to_wrap="LlamaDecoderLayer")
    assert fsdp1_options(args) == {"policy": "TRANSFORMER_BASED_WRAP", "classes": ["LlamaDecoderLayer"],
                                   "min_num_params": 0, "use_orig_params": False}
    sized = fsdp1_options(_args(tmp_path, fsdp_version=1, min_num_params=1000, auto_wrap_policy="SIZE_BASED_WRAP"))
    assert sized["policy"] == "SIZE_BASED_WRAP" and sized["min_num_params"] == 1000
    assert sized["use_orig_params"] is True  # transformers' default on both stacks
    # min_num_params alone: 4.57 switches to the size-based policy; 5.x keeps its default, transformer-based
    alone = fsdp1_options(_args(tmp_path, fsdp_version=1, min_num_params=1000))
    assert alone["policy"] == ("SIZE_BASED_WRAP" if stack() == "old" else "TRANSFORMER_BASED_WRAP")


def test_default_fsdp_version_differs_between_stacks(tmp_path, fsdp_env):
    """No version asked for: transformers 5.x picks FSDP2, 4.57 leaves it to accelerate's FSDP_VERSION (1)."""
    from gradflow.setup.trainer_source import fsdp1_options

    options = fsdp1_options(_args(tmp_path))
    if stack() == "old":
        assert options is not None and options["policy"] == "TRANSFORMER_BASED_WRAP"
    else:
        assert options is None
