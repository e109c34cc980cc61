"""ddp-unused-parameters: trainable parameters with no gradient under DDP with find_unused_parameters=False.

DDP runs for real on one gloo rank on the CPU: the same fault breaks the second step there already.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.helpers.builders import WithSpareHead, assert_fires, assert_silent, base, batch, lora, probe, tiny_batch
from tests.helpers.dist import process_group  # noqa: F401  (fixture)
from tests.helpers.vlm import VISION_LORA, tiny_llava, vlm_batch

SLUG = "ddp-unused-parameters"
UNFINISHED = "Expected to have finished reduction in the prior iteration"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _train(model, data, steps: int = 2) -> str | None:
    """Plain AdamW steps through the DDP wrapper, no gradflow involved: None, or the first error line."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    try:
        for _ in range(steps):
            out = model(**data)
            (out["loss"] if isinstance(out, dict) else out.loss).backward()
            optimizer.step()
            optimizer.zero_grad()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def _embeds_batch(model):
    """The batch as inputs_embeds: the trainable input embedding then takes no part in the forward."""
    data = batch(model)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(data.pop("input_ids"))
    return {**data, "inputs_embeds": embeds}


# --- fires ------------------------------------------------------------------------------------------------------------
def test_custom_model_with_a_spare_trainable_head(process_group):
    model = WithSpareHead()
    report = probe(DistributedDataParallel(model, find_unused_parameters=False), tiny_batch())
    finding = assert_fires(report, SLUG, location="module.spare")
    assert finding.params == ["module.spare.weight", "module.spare.bias"]
    assert "module.spare.weight" in finding.message and finding.fix.applicability == "display-only"
    # a fresh model: the probed wrapper's reducer hooks stay on the first one's parameters
    assert _train(DistributedDataParallel(WithSpareHead(), find_unused_parameters=False),
                  tiny_batch()).startswith(UNFINISHED)


def test_full_finetune_fed_inputs_embeds(process_group):
    model = base()
    data = _embeds_batch(model)
    report = probe(DistributedDataParallel(model), data)  # find_unused_parameters defaults to False
    finding = assert_fires(report, SLUG, location="module.model.embed_tokens")
    assert finding.params == ["module.model.embed_tokens.weight"]
    assert _train(DistributedDataParallel(base()), data).startswith(UNFINISHED)


# --- stays silent -----------------------------------------------------------------------------------------------------
def test_silent_with_find_unused_parameters(process_group):
    model = WithSpareHead()
    report = probe(DistributedDataParallel(model, find_unused_parameters=True), tiny_batch())
    assert_silent(report, SLUG)
    assert report.snapshot.ddp_find_unused is True
    assert _train(DistributedDataParallel(WithSpareHead(), find_unused_parameters=True), tiny_batch(), steps=3) is None


def test_silent_when_every_trainable_parameter_gets_a_gradient(process_group):
    model = lora()
    data = batch(model)
    report = probe(DistributedDataParallel(model, find_unused_parameters=False), data)
    assert_silent(report, SLUG)
    assert report.snapshot.ddp_find_unused is False
    assert _train(DistributedDataParallel(lora(), find_unused_parameters=False), data, steps=3) is None


def test_silent_without_ddp():
    assert_silent(probe(WithSpareHead(), tiny_batch()), SLUG)


def test_vlm_text_only_batch_names_the_vision_tower(process_group):
    """LoRA on a LLaVA's vision tower, a text-only batch: DDP raises at step 2; the tower is named, not the root."""
    model = lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA)
    data = vlm_batch(images=False)
    report = probe(DistributedDataParallel(model, find_unused_parameters=False), data)
    finding = assert_fires(report, SLUG, location="module.base_model.model.model.vision_tower")
    assert finding.params and all(".vision_tower." in p for p in finding.params)
    # the same fault without gradflow: the second step raises
    assert _train(DistributedDataParallel(lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA),
                                          find_unused_parameters=False), data).startswith(UNFINISHED)


def test_silent_on_a_vlm_batch_with_images(process_group):
    model = lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA)
    report = probe(DistributedDataParallel(model, find_unused_parameters=False), vlm_batch())
    assert_silent(report, SLUG, "trainable-param-unused", "grad-missing-unexplained")
