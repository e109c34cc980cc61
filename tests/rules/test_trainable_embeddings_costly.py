"""trainable-embeddings-costly: embedding / lm_head matrices trainable beside adapters."""

from __future__ import annotations

import pytest

from tests.helpers.builders import (assert_fires, assert_silent, base, batch, findings, lora, probe,
                                    save_adapter_and_reload)

SLUG = "trainable-embeddings-costly"
EMBED = "base_model.model.model.embed_tokens"
HEAD = "base_model.model.lm_head"
VOCAB, HIDDEN = 512, 64


def _assert_costly(report, location: str, numel: int):
    finding = assert_fires(report, SLUG, location=location)
    assert f"{numel:,} parameters" in finding.message
    assert "KiB" in finding.message or "MiB" in finding.message
    assert finding.fix.applicability == "unsafe"  # refreezing changes what the model learns
    return finding


def _assert_deliberate(report, location: str, kind: str):
    """A modules_to_save copy: info only, its kind and cost named, and the run does not fail on warnings."""
    got = findings(report, SLUG)
    assert len(got) == 1, got
    finding = got[0]
    assert finding.severity == "info" and finding.location == location
    assert finding.message.startswith(f"{kind} {location} trained as a full copy through modules_to_save")
    assert f"{VOCAB * HIDDEN:,} parameters" in finding.message
    assert not report.fails("warning")
    return finding


def test_embedding_unfrozen_as_the_workaround():
    """SPEC §1: the embedding made trainable so that checkpointed layers get an input that requires grad."""
    model = lora()
    model.get_input_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = _assert_costly(report, EMBED, VOCAB * HIDDEN)
    assert finding.params == [f"{EMBED}.weight"]
    assert finding.message.startswith(f"input embedding {EMBED} trainable beside adapters")
    assert "input-grad hook" in finding.fix.title
    # weight + grad in fp32 and two fp32 Adam moments: 16 bytes per parameter
    assert "512.0 KiB" in finding.message


def test_lm_head_unfrozen_by_hand():
    model = lora()
    model.get_output_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = _assert_costly(report, HEAD, VOCAB * HIDDEN)
    assert finding.message.startswith(f"output head {HEAD} trainable beside adapters")
    assert "input embedding" not in finding.message
    assert "hook" not in finding.fix.title  # the input-grad hook does nothing for a head


def test_both_matrices_unfrozen_by_hand_are_told_apart():
    model = lora()
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_output_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = _assert_costly(report, EMBED, 2 * VOCAB * HIDDEN)
    assert f"input embedding {EMBED} and output head {HEAD}" in finding.message


def test_both_matrices_of_gpt2_reported_once_when_tied():
    """GPT-2 ties wte and lm_head: one matrix, counted once, and named as both."""
    model = lora("tiny-gpt2")
    model.get_input_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = _assert_costly(report, "base_model.model.transformer.wte", VOCAB * HIDDEN)
    assert finding.message.startswith(
        "input embedding base_model.model.transformer.wte (tied to the output head) trainable")


def test_gpt2_position_embedding_is_not_taken_for_the_tied_head():
    model = lora("tiny-gpt2")
    model.get_base_model().transformer.wpe.weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.transformer.wpe")
    assert finding.message.startswith("input embedding base_model.model.transformer.wpe trainable")
    assert "tied" not in finding.message


# --- modules_to_save: deliberate (PEFT's way to train new tokens), so info only ------------------------------------------
def test_embedding_in_modules_to_save_is_info():
    model = lora(modules_to_save=["embed_tokens"])
    report = probe(model, batch(model))
    finding = _assert_deliberate(report, f"{EMBED}.modules_to_save.default", "input embedding")
    assert finding.fix.applicability == "display-only" and "trainable_token_indices" in finding.fix.title


def test_lm_head_in_modules_to_save_is_info_without_hook_advice():
    model = lora(modules_to_save=["lm_head"])
    report = probe(model, batch(model))
    finding = _assert_deliberate(report, f"{HEAD}.modules_to_save.default", "output head")
    assert finding.fix is None or "hook" not in finding.fix.title
    assert "input embedding" not in finding.message


def test_modules_to_save_reloaded_with_is_trainable_is_info(tmp_path):
    """The second way to get there: an adapter saved with modules_to_save, reloaded for more training."""
    model = save_adapter_and_reload(lora(modules_to_save=["embed_tokens"]), tmp_path, is_trainable=True)
    report = probe(model, batch(model))
    _assert_deliberate(report, f"{EMBED}.modules_to_save.default", "input embedding")


@pytest.mark.parametrize("module, kind", [("wte", "input embedding"), ("lm_head", "output head")])
def test_gpt2_modules_to_save_is_info(module, kind):
    """With tied weights PEFT copies only the listed module: the copy is not tied (the head keeps the original)."""
    model = lora("tiny-gpt2", modules_to_save=[module])
    report = probe(model, batch(model))
    prefix = "base_model.model.transformer." if module == "wte" else "base_model.model."
    finding = _assert_deliberate(report, f"{prefix}{module}.modules_to_save.default", kind)
    assert "tied" not in finding.message


def test_embedding_unfrozen_by_hand_beside_a_head_in_modules_to_save_still_warns():
    model = lora(modules_to_save=["lm_head"])
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    report = probe(model, batch(model))
    by_severity = {f.severity: f for f in findings(report, SLUG)}
    assert sorted(by_severity) == ["info", "warning"]
    assert by_severity["warning"].params == [f"{EMBED}.weight"]  # the refreeze fix never touches the chosen copy
    assert by_severity["info"].params == [f"{HEAD}.modules_to_save.default.weight"]
    assert report.fails("warning")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_the_embedding_is_intended():
    model = lora()
    model.get_input_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model), trainable=r"lora_|embed_tokens")
    assert_silent(report, SLUG)


def test_silent_for_a_full_fine_tune_without_adapters():
    model = base()
    assert_silent(probe(model, batch(model)), SLUG)


def test_silent_for_lora_on_the_embedding():
    """LoRA adapters on embed_tokens train a low-rank update, not the matrix."""
    model = lora(target_modules=["embed_tokens", "q_proj", "v_proj"])
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert any("lora_embedding_A" in p.name and p.requires_grad for p in report.snapshot.params)


def test_silent_for_trainable_token_indices():
    """PEFT's trainable tokens train a few rows of the embedding, not the matrix."""
    model = lora(trainable_token_indices=[3, 4, 5])
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert any("trainable_tokens_delta" in p.name and p.requires_grad for p in report.snapshot.params)
