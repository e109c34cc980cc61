"""Encoding for training: loss on assistant/completion tokens, dynamic padding, bad lines, --seq-len."""

from __future__ import annotations

import json

import pytest

from gradflow.data import Sample, collate, encode, supervised_count
from gradflow.errors import GradflowError
from gradflow.presets import build_tokenizer
from gradflow.training.engine import TrainOptions, prepare_data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _supervised_text(tok, row):
    return tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


def test_messages_supervise_only_the_assistant_content(tok):
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello!"}]
    row = encode(Sample(1, "messages", {"messages": msgs}), tok, 256)
    learned = _supervised_text(tok, row)
    assert learned.startswith("hello!<|end|>")
    assert "hi there" not in learned and "be kind" not in learned and "<|assistant|>" not in learned
    row_all = encode(Sample(1, "messages", {"messages": msgs}), tok, 256, loss_on="all")
    assert all(l != -100 for l in row_all["labels"])
    assert row_all["input_ids"] == row["input_ids"]


def test_prompt_completion_supervises_completion_and_eos(tok):
    row = encode(Sample(1, "prompt", {"prompt": "Q: 2+2?", "completion": " 4"}), tok, 256)
    assert _supervised_text(tok, row) == " 4<|end|>"
    assert supervised_count(row["labels"]) == len(tok(" 4")["input_ids"]) + 1


def test_collate_pads_to_the_longest_row_not_seq_len(tok):
    rows = [encode(Sample(1, "text", {"text": "a" * n}), tok, 512) for n in (5, 9)]
    batch = collate(rows, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"].sum().item() == 14
    assert (batch["labels"][0, 5:] == -100).all()


def _write(tmp_path, records, raw=()):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(raw))
    return str(path)


def test_bad_lines_are_skipped_and_named_file_line(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "q", "completion": "a"},
                             {"messages": [{"role": "robot", "content": "x"}]}], raw=["{not json\n"])
    prepared = prepare_data(path, tok, TrainOptions(seq_len=64))
    assert len(prepared.rows) == 1
    assert [str(p).split(": ")[0] for p in prepared.problems] == [f"{path}:2", f"{path}:3"]
    with pytest.raises(GradflowError, match=r"data.jsonl:2: messages\[0\] has unknown role 'robot'"):
        prepare_data(path, tok, TrainOptions(seq_len=64, strict=True))


def test_seq_len_below_every_prompt_is_an_error(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "a long prompt " * 4, "completion": "x"}] * 2)
    with pytest.raises(GradflowError, match="--seq-len 8 is shorter than the prompt of every sample"):
        prepare_data(path, tok, TrainOptions(seq_len=8))
    prepared = prepare_data(path, tok, TrainOptions(seq_len=8, loss_on="all"))
    assert len(prepared.rows) == 2  # with the loss on every token, the prompt itself is learned


def test_samples_whose_prompt_fills_seq_len_are_skipped(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "p" * 40, "completion": "x"}, {"prompt": "p", "completion": "yes"}])
    prepared = prepare_data(path, tok, TrainOptions(seq_len=16))
    assert len(prepared.rows) == 1
    assert "leaves no supervised token" in str(prepared.problems[0]) and ":1:" in str(prepared.problems[0])
