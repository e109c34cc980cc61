"""trainable-embeddings-costly: embedding / lm_head matrices trainable beside adapters."""

from __future__ import annotations

from _builders import assert_fires, assert_silent, base, batch, lora, probe

SLUG = "trainable-embeddings-costly"
EMBED = "base_model.model.model.embed_tokens"
VOCAB, HIDDEN = 512, 64


def _assert_costly(report, location: str, numel: int):
    finding = assert_fires(report, SLUG, location=location)
    assert f"{numel:,} parameters" in finding.message
    assert "KiB" in finding.message or "MiB" in finding.message
    assert finding.fix.applicability == "unsafe"  # refreezing changes what the model learns
    return finding


def test_embedding_unfrozen_as_the_workaround():
    """SPEC §1: the embedding made trainable so that checkpointed layers get an input that requires grad."""
    model = lora()
    model.get_input_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = _assert_costly(report, EMBED, VOCAB * HIDDEN)
    assert finding.params == [f"{EMBED}.weight"]
    # weight + grad in fp32 and two fp32 Adam moments: 16 bytes per parameter
    assert "512.0 KiB" in finding.message


def test_lm_head_unfrozen_by_hand():
    model = lora()
    model.get_output_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    _assert_costly(report, "base_model.model.lm_head", VOCAB * HIDDEN)


def test_embedding_in_modules_to_save():
    """modules_to_save=['embed_tokens'] trains a full copy of the matrix."""
    model = lora(modules_to_save=["embed_tokens"])
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=f"{EMBED}.modules_to_save.default")
    assert f"{VOCAB * HIDDEN:,} parameters" in finding.message


def test_both_matrices_of_gpt2_reported_once_when_tied():
    """GPT-2 ties wte and lm_head: one matrix, counted once."""
    model = lora("tiny-gpt2")
    model.get_input_embeddings().weight.requires_grad_(True)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.transformer.wte")
    assert finding.message.startswith("embedding matrix trainable")


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
