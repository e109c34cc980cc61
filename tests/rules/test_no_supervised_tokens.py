"""no-supervised-tokens: every label is -100, so there is nothing to learn (NaN or zero loss)."""

from __future__ import annotations

import torch

from gradflow.setup.presets import build_tokenizer
from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe

SLUG = "no-supervised-tokens"


def _assert_nothing_supervised(report):
    finding = assert_fires(report, SLUG, location=None)
    assert "-100" in finding.message
    # a NaN loss from an empty mean is explained here, not as a numerical fault
    assert_silent(report, "nonfinite-grad")
    return finding


def test_labels_all_ignored():
    model = lora()
    data = batch(model)
    data["labels"] = torch.full_like(data["labels"], -100)
    report = probe(model, data)
    _assert_nothing_supervised(report)
    assert report.loss["value"] is None  # NaN: an empty mean


def _prompt_completion_batch(tokenizer, prompt: str, completion: str, seq_len: int):
    """What a completion-only collator does: tokenize, mask the prompt, truncate to seq_len."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + completion_ids)[:seq_len]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:seq_len]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "labels": torch.tensor([labels])}


def test_completion_truncated_away_by_max_length():
    """A long prompt and a max length that cuts the completion off: every kept label is masked."""
    tokenizer = build_tokenizer()
    model = lora()
    data = _prompt_completion_batch(tokenizer, "Summarise the following report. " * 4, "It is fine.", seq_len=48)
    report = probe(model, data)
    _assert_nothing_supervised(report)


def test_only_the_first_position_supervised():
    """Causal LMs predict token t+1 from t: a label on position 0 alone is shifted away."""
    model = lora()
    data = batch(model)
    data["labels"][:, 1:] = -100
    _assert_nothing_supervised(probe(model, data))


def test_all_ignored_with_a_custom_loss_fn():
    model = lora()
    data = batch(model)
    data["labels"] = torch.full_like(data["labels"], -100)

    def loss_fn(m, d):
        logits = m(input_ids=d["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), d["labels"][:, 1:].flatten())

    _assert_nothing_supervised(probe(model, data, loss_fn=loss_fn))


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_the_completion_fits():
    tokenizer = build_tokenizer()
    model = lora()
    data = _prompt_completion_batch(tokenizer, "Summarise the following report. ", "It is fine.", seq_len=48)
    report = probe(model, data)
    assert_silent(report, SLUG)
    assert report.loss["value"] is not None


def test_silent_with_one_supervised_token_after_the_first():
    model = lora()
    data = batch(model)
    data["labels"][:, :-1] = -100
    assert_silent(probe(model, data), SLUG)


def test_silent_without_labels_in_the_batch():
    """A loss_fn that builds its own targets: gradflow cannot see a mask, and says nothing."""
    model = lora()
    data = batch(model)
    labels = data.pop("labels")

    def loss_fn(m, d):
        logits = m(**d).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    assert_silent(probe(model, data, loss_fn=loss_fn), SLUG)
