"""The probe's replay (gradflow.probing.cuts.replay): where a trainable parameter gets no gradient, the step's
forward runs again with the ops that cut the graph watched. Through a distributed wrapper, that forward has no
backward after it; the wrapper must train on afterwards as if the probe had not been there (one gloo rank on the
CPU, each wrapper for real)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.builders import Block, DetachedBranch, WithSpareHead, assert_fires, custom_with, probe, tiny_batch
from tests.helpers.dist import process_group  # noqa: F401  (fixture)

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in"),
              pytest.mark.filterwarnings("ignore:.*FSDP:FutureWarning")]


def _model():
    torch.manual_seed(0)
    return custom_with(DetachedBranch)


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=True)


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (1,)))


def _steps(model, data, steps: int = 2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(**data)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("wrap", [_ddp, _fsdp1, _fsdp2], ids=["ddp", "fsdp1", "fsdp2"])
def test_the_replay_through_a_wrapper_names_the_cut_and_training_goes_on(wrap, process_group):
    data = tiny_batch()
    wrapped = wrap(_model())
    report = probe(wrapped, data)
    finding = assert_fires(report, "graph-break")
    assert finding.location.endswith("blocks.1")
    assert any("blocks.1.proj.lora_A" in p for p in finding.params)
    # the same wrapper trains, with the losses of a twin that was never probed
    assert _steps(wrapped, data) == pytest.approx(_steps(wrap(_model()), data))


def test_fsdp1_zeros_of_a_module_that_never_ran_are_missing_gradients(process_group):
    torch.manual_seed(0)
    report = probe(_fsdp1(WithSpareHead()), tiny_batch())
    finding = assert_fires(report, "trainable-param-unused")
    assert finding.location.endswith("spare")
    grads = {p.name: p.grad for p in report.snapshot.params if p.requires_grad}
    assert grads["_fsdp_wrapped_module.spare.weight"] == "none"
    assert grads["_fsdp_wrapped_module.lm.head.weight"] == "ok"



@pytest.mark.parametrize(("block", "forwards"), [(Block, 1), (DetachedBranch, 2)], ids=["healthy", "cut"])
def test_fsdp1_replays_only_for_a_lost_gradient(block, forwards, process_group):
    """FSDP1 zero-fills unreached parameters' gradients, so zeros there may be lost gradients and are replayed; but
    lora_A's zeros at step 0 are LoRA's start (lora_B got a gradient): a healthy probe runs its forward once."""
    torch.manual_seed(0)
    wrapped = _fsdp1(custom_with(block))
    calls = []
    wrapped.module.register_forward_pre_hook(lambda *_: calls.append(1))
    report = probe(wrapped, tiny_batch())
    assert len(calls) == forwards
    assert report.slugs() == (["lora-zero-init"] if block is Block else ["graph-break", "lora-zero-init"])
