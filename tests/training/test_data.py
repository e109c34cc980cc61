"""Encoding for training: loss on assistant/completion tokens, dynamic padding, bad lines (invalid UTF-8
included), --seq-len and the cut before tokenisation."""

from __future__ import annotations

import json
import re

import pytest

from gradflow.data.jsonl import CHARS_PER_TOKEN, Sample, _kind, collate, encode, read_jsonl, supervised_count
from gradflow.errors import GradflowError
from gradflow.setup.presets import build_tokenizer
from gradflow.training.dataset import read_data
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
    with pytest.raises(GradflowError, match=r"data.jsonl:2: messages\[0\] has an unknown role \(use system, user, "
                                            r"assistant, tool\) \(and 1 more\)"):
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


def test_invalid_utf8_is_a_bad_line_named_file_line_not_replacement_characters(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom first line"}\n'  # a BOM at the start of the file is fine
                     b'{"text": "bad \xff\xfe byte"}\n'
                     b'{"prompt": "q", "completion": "caf\xc3\xa9"}\n'
                     b'{"text": "lone \\ud800 surrogate"}\n'
                     b'{"text": "pair \\ud83d\\ude00 is fine"}\n')
    samples, problems = read_jsonl(str(path))
    assert [s.line for s in samples] == [1, 3, 5]
    assert [str(p).split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:4"]
    assert "not valid UTF-8" in problems[0].what and "surrogate" in problems[1].what
    assert samples[1].record["completion"] == "café" and samples[2].record["text"] == "pair 😀 is fine"
    assert not any("\ufffd" in json.dumps(s.record, ensure_ascii=False) for s in samples)
    with pytest.raises(GradflowError, match=r"data.jsonl:2: not valid UTF-8"):
        prepare_data(str(path), tok, TrainOptions(seq_len=64, strict=True))


class _Recording:
    """The real tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


HUGE = 3_000_000  # characters: tokenised whole, this takes tens of seconds


@pytest.mark.parametrize("record", [
    {"text": "x" * HUGE},
    {"prompt": "p" * HUGE, "completion": "c"},
    {"prompt": "q", "completion": "c" * HUGE},
    {"messages": [{"role": "user", "content": "u" * HUGE}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * HUGE},
                  *[{"role": "user", "content": "more"}, {"role": "assistant", "content": "b" * HUGE}] * 3]},
], ids=["text", "prompt", "completion", "user-turn", "many-turns"])
def test_text_far_longer_than_seq_len_is_cut_before_tokenisation(tmp_path, tok, record):
    path = _write(tmp_path, [record, {"prompt": "q", "completion": "short"}])
    spy = _Recording(tok)
    prepared = prepare_data(path, spy, TrainOptions(seq_len=64))
    budget = 64 * CHARS_PER_TOKEN
    assert spy.lengths and max(spy.lengths) <= budget + 200  # the bound, plus the chat template's own text
    assert sum(spy.lengths) <= 20 * budget
    assert all(len(r["input_ids"]) <= 64 for r in prepared.rows)


@pytest.mark.parametrize("record", [
    {"text": "word " * 2000},
    {"prompt": "q", "completion": "the answer is " * 500},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "reply " * 1000}]},
], ids=["text", "completion", "messages"])
def test_cutting_keeps_the_first_seq_len_tokens(tok, record):
    sample = Sample(1, _kind(record), record)
    cut = encode(sample, tok, 16)  # 16 * 64 = 1024 characters reach the tokenizer
    whole = encode(sample, tok, 10**6)
    assert cut["cut"] and not whole["cut"]
    assert cut["input_ids"] == whole["input_ids"][:16] and cut["labels"] == whole["labels"][:16]
    assert cut["full_length"] < whole["full_length"]  # a lower bound once cut


def test_hostile_lines_are_bad_lines_among_good_ones(tmp_path):
    """A line nested thousands deep or holding a 5,000-digit integer is skipped like any bad line, named by its
    number and never quoted; the good lines around it still train (issue 21)."""
    good = json.dumps({"prompt": "q", "completion": "a"})
    lines = [good] * 3 + ['{"text": ' + "[" * 5000 + "]" * 5000 + "}", '{"text": "x", "n": -' + "7" * 5000 + "}",
                          '{"text": ' + "[" * 65 + "]" * 65 + "}", '{"text": ' + "[" * 63 + "]" * 63 + "}", good]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n")
    samples, problems = read_jsonl(str(path))
    assert [s.line for s in samples] == [1, 2, 3, 8]
    assert [str(p) for p in problems] == [f"{path}:4: nested deeper than 64 levels",
                                          f"{path}:5: holds an integer longer than 30 digits",
                                          f"{path}:6: nested deeper than 64 levels",
                                          f"{path}:7: 'text' must be a non-empty string"]


def test_a_tool_turn_is_context_not_learned(tok):
    """`tool` is a role (issue 21): its content goes into the prompt like a user turn, and only the assistant's
    content is supervised."""
    msgs = [{"role": "user", "content": "what is 2+2"}, {"role": "tool", "content": "calculator says 4"},
            {"role": "assistant", "content": "four"}]
    row = encode(Sample(1, "messages", {"messages": msgs}), tok, 256)
    assert "calculator says 4" in tok.decode(row["input_ids"])
    assert _supervised_text(tok, row).startswith("four<|end|>") and "calculator" not in _supervised_text(tok, row)


def test_a_pipe_is_read_once_into_a_private_copy_named_as_given(tmp_path):
    """--data <(cmd): the stream is read once into a 0600 temporary file; reading the copy again gives the same
    samples, and a bad line is named by the path the user gave (issue 21)."""
    import os
    import stat
    import threading

    from gradflow.data.jsonl import read_once

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    lines = json.dumps({"prompt": "q", "completion": "a"}) + "\n{broken\n"

    def feed():
        with open(fifo, "w") as fh:
            fh.write(lines)

    threading.Thread(target=feed, daemon=True).start()
    copy = read_once(str(fifo))
    assert copy != str(fifo) and stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    for _ in range(2):  # read as often as needed: the same bytes each time
        samples, problems = read_jsonl(copy)
        assert [s.line for s in samples] == [1] and [str(p) for p in problems] == [f"{fifo}:2: not valid JSON "
                                                                                  "(Expecting property name "
                                                                                  "enclosed in double quotes)"]
    assert read_once(str(tmp_path)) == str(tmp_path) and read_once(copy) == copy
    # a stream whose every line is bad is named as given, not as its temporary copy
    with open(copy, "w") as fh:
        fh.write("{broken\n")
    with pytest.raises(GradflowError, match=rf"every line of {re.escape(str(fifo))} is malformed"):
        read_data(copy, TrainOptions())
