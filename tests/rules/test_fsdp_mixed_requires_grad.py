"""fsdp-mixed-requires-grad: an FSDP1 unit without use_orig_params that mixes frozen and trainable parameters.

FSDP1 raises when it wraps such a unit, so the rule reads the plan (gradflow.setup.wrappers.plan_fsdp1) before wrapping;
each case also wraps for real (one gloo rank on the CPU) to show what torch does with that plan.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from gradflow.api import snapshot
from gradflow.fixes import findings_for
from gradflow.setup.wrappers import plan_fsdp1
from tests.helpers.builders import assert_fires, assert_silent, lora, tiny_lm
from tests.helpers.dist import process_group  # noqa: F401  (fixture)

SLUG = "fsdp-mixed-requires-grad"
UNIFORM = "requires_grad=True and False|uniform `requires_grad`"  # FSDP1's auto-wrap check, or its flattening's
CPU = torch.device("cpu")

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in"),
              pytest.mark.filterwarnings("ignore:.*has both parameters with requires_grad=True and False:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning"),
              pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")]


def _planned(model, **plan):
    snap = snapshot(model, static=True)
    snap.wrappers = plan_fsdp1(model, **plan)
    return snap


def _findings(snap):
    return types.SimpleNamespace(findings=findings_for(snap), snapshot=snap)


def _wrap(model, **options):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=CPU, **options)


def _layer_policy(model):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({type(model.get_base_model().model.layers[0])})


# --- fires ------------------------------------------------------------------------------------------------------------
def test_lora_decoder_layers_as_units(process_group):
    model = lora()
    policy = _layer_policy(model)
    finding = assert_fires(_findings(_planned(model, auto_wrap_policy=policy)), SLUG,
                           location="base_model.model.model.layers.0")
    assert "base_model.model.model.layers.0–" in finding.message
    assert all("lora_" in p for p in finding.params) and finding.fix.applicability == "display-only"
    with pytest.raises(ValueError, match=UNIFORM):
        _wrap(model, auto_wrap_policy=policy)


def test_partly_frozen_custom_model_in_one_root_unit(process_group):
    model = tiny_lm()  # frozen base
    model.head.requires_grad_(True)
    finding = assert_fires(_findings(_planned(model)), SLUG, location=None)
    assert "the root module" in finding.message and finding.params == ["head.weight"]
    with pytest.raises(ValueError, match=UNIFORM):
        _wrap(model)


# --- stays silent -----------------------------------------------------------------------------------------------------
def test_silent_with_use_orig_params_planned_and_wrapped(process_group):
    model = lora()
    policy = _layer_policy(model)
    assert_silent(_findings(_planned(model, auto_wrap_policy=policy, use_orig_params=True)), SLUG)
    wrapped = _wrap(model, auto_wrap_policy=policy, use_orig_params=True)
    snap = snapshot(wrapped, static=True)  # the units read off the wrapped model
    assert [u.kind for u in snap.wrappers] == ["fsdp1"] * len(snap.wrappers) and len(snap.wrappers) > 1
    assert all(u.use_orig_params and not u.planned for u in snap.wrappers)
    assert_silent(_findings(snap), SLUG)


def test_silent_with_peft_policy_giving_adapters_their_own_units(process_group):
    from peft.utils.other import fsdp_auto_wrap_policy

    model = lora()
    policy = fsdp_auto_wrap_policy(model)
    snap = _planned(model, auto_wrap_policy=policy)
    assert any(u.module.endswith("lora_A.default") for u in snap.wrappers)
    assert_silent(_findings(snap), SLUG)
    _wrap(model, auto_wrap_policy=policy)  # FSDP1 accepts this plan


def test_silent_without_fsdp():
    assert_silent(_findings(snapshot(lora(), static=True)), SLUG)
