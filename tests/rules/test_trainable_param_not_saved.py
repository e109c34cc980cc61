"""trainable-param-not-saved: trainable params the adapter's save_pretrained drops."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from tests.helpers.builders import (RotatedBlock, assert_fires, assert_silent, base, batch, custom_lora, lora, probe,
                                    tiny_batch, tiny_lm)

SLUG = "trainable-param-not-saved"


def _really_dropped(model) -> set[str]:
    """Trainable params whose tensor is not in what save_pretrained writes (PEFT's own state-dict filter)."""
    saved = {t.data_ptr() for t in get_peft_model_state_dict(model).values()}
    return {n for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in saved}


def test_custom_rotation_unfrozen_by_hand():
    """SPEC §1: SO(8) rotations unfrozen after get_peft_model train, and are not saved."""
    model = custom_lora(tiny_lm(block=RotatedBlock))
    for block in model.base_model.model.blocks:
        block.rot.requires_grad_(True)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0.rot")
    assert set(finding.params) == _really_dropped(model) == {f"base_model.model.blocks.{i}.rot.theta"
                                                             for i in range(3)}


def test_norms_unfrozen_by_hand():
    model = lora()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0.input_layernorm")
    assert set(finding.params) == _really_dropped(model)
    assert len(finding.params) == 4 * 2 + 1


def test_lm_head_unfrozen_by_hand():
    model = lora()
    model.get_output_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.lm_head")
    assert set(finding.params) == _really_dropped(model)


def test_the_reloaded_adapter_really_lacks_them(tmp_path):
    """Round trip: what the finding names comes back at its initial value after save/load."""
    model = custom_lora(tiny_lm(block=RotatedBlock))
    for block in model.base_model.model.blocks:
        block.rot.requires_grad_(True)
    with torch.no_grad():
        model.base_model.model.blocks[0].rot.theta.fill_(0.1)  # as after training
    finding = assert_fires(probe(model, tiny_batch()), SLUG)
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_lm(block=RotatedBlock), str(tmp_path / "adapter"))
    params = dict(reloaded.named_parameters())
    assert torch.all(params[finding.params[0]] == 0)  # the trained rotation is gone


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_with_modules_to_save():
    model = custom_lora(tiny_lm(block=RotatedBlock), modules_to_save=["rot"])
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert not _really_dropped(model)


def test_silent_for_a_model_without_peft():
    """A full fine-tune saves every parameter with the model itself."""
    model = base()
    assert_silent(probe(model, batch(model)), SLUG)


def test_silent_for_a_fresh_lora():
    model = lora()
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert not _really_dropped(model)
