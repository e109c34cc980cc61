"""fsdp-mixed-dtype: FSDP units whose parameters do not share the dtype torch requires.

FSDP1 refuses the unit when it wraps, so the rule reads the plan (gradflow.setup.wrappers.plan_fsdp1); fully_shard (FSDP2)
wraps and fails at the first forward, so the rule reads the wrapped model. Everything runs on one gloo rank on the CPU.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

import gradflow
from gradflow.api import snapshot
from gradflow.rules import run_rules
from gradflow.setup.wrappers import plan_fsdp1
from tests.helpers.builders import assert_fires, assert_silent, base, lora, tiny_batch, tiny_lm
from tests.helpers.dist import process_group  # noqa: F401  (fixture)

SLUG = "fsdp-mixed-dtype"
CPU = torch.device("cpu")

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in"),
              pytest.mark.filterwarnings("ignore:.*has both parameters with requires_grad=True and False:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning"),
              pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")]


def _planned(model, **plan):
    snap = snapshot(model, static=True)
    snap.wrappers = plan_fsdp1(model, **plan)
    return types.SimpleNamespace(findings=run_rules(snap), snapshot=snap)


def _bf16_lora():
    """A bf16 base with LoRA adapters PEFT keeps in fp32 (autocast_adapter_dtype, its default)."""
    model = lora(model=base(dtype=torch.bfloat16))
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}
    return model


def _layer_policy(model):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({type(model.get_base_model().model.layers[0])})


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,))


# --- fires ------------------------------------------------------------------------------------------------------------
def test_fsdp1_fp32_adapters_in_bf16_layers_even_with_mixed_precision(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    model = _bf16_lora()
    options = {"auto_wrap_policy": _layer_policy(model), "use_orig_params": True,
               "mixed_precision": MixedPrecision(param_dtype=torch.bfloat16)}
    finding = assert_fires(_planned(model, **options), SLUG, location="base_model.model.model.layers.0")
    assert "float32" in finding.message and "bfloat16" in finding.message and "param_dtype=bfloat16" in finding.message
    assert all("lora_" in p for p in finding.params)
    with pytest.raises(ValueError, match="uniform dtype"):
        FullyShardedDataParallel(model, device_id=CPU, **options)


def test_fully_shard_group_with_trainable_bf16_and_fp32(process_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny_lm(freeze=False)
    model.blocks[1].to(torch.bfloat16)  # a full fine-tune with one block in bf16, all in the root group
    fully_shard(model, mesh=_mesh(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    report = gradflow.inspect(model, static=True)
    finding = assert_fires(report, SLUG, location=None)
    assert "fully_shard" in finding.message and finding.params[0].startswith("blocks.1.")
    assert [u.kind for u in report.snapshot.wrappers] == ["fsdp2"]
    with pytest.raises(AssertionError, match="uniform original parameter dtype"):
        model(**tiny_batch())


# --- stays silent -----------------------------------------------------------------------------------------------------
def test_silent_fsdp1_when_the_whole_model_is_bf16(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _bf16_lora().to(torch.bfloat16)
    options = {"auto_wrap_policy": _layer_policy(model), "use_orig_params": True}
    assert_silent(_planned(model, **options), SLUG)
    FullyShardedDataParallel(model, device_id=CPU, **options)


def test_silent_fully_shard_frozen_bf16_base_with_fp32_adapters(process_group):
    """fully_shard checks the trainable parameters only: a frozen bf16 base beside fp32 adapters is fine."""
    from torch.distributed.fsdp import fully_shard

    model = _bf16_lora()
    mesh = _mesh()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = gradflow.inspect(model, static=True)
    assert len(report.snapshot.wrappers) == 5
    assert_silent(report, SLUG)
    ids = tiny_batch(vocab=model.config.vocab_size)
    model(**ids).loss.backward()  # the first forward and backward run


def test_silent_without_fsdp():
    assert_silent(gradflow.inspect(_bf16_lora(), static=True), SLUG)
