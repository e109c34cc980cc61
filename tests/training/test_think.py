"""/think samples: the four blocks, once each, in order; the hash; and bad samples as bad lines."""

from __future__ import annotations

import hashlib
import json

import pytest

from gradflow.data import read_jsonl, validate
from gradflow.training.think import parse, think_hash

GOOD = ("<think-task> add two numbers </think-task>\n<think-safety>benign</think-safety>"
        "<think-policy>be brief\n</think-policy>\n<final>4</final>")


def test_parse_returns_final_and_hash_of_stripped_blocks():
    think, why = parse(GOOD)
    assert why is None
    assert think.final == "4"
    expected = hashlib.sha256("add two numbers\nbenign\nbe brief".encode()).hexdigest()
    assert think.sha256 == expected == think_hash(" add two numbers ", "benign", "be brief\n")
    assert "add two" not in think.preview() and "4" in think.preview()


@pytest.mark.parametrize("content, why", [
    (GOOD.replace("</think-safety>", ""), "lacks </think-safety>"),
    (GOOD.replace("<final>4</final>", "<final>4</final><final>5</final>"), "<final> 2 times"),
    ("<think-safety>b</think-safety><think-task>a</think-task><think-policy>c</think-policy><final>x</final>",
     "out of order"),
    ("<think-task>a<think-safety>b</think-safety></think-task><think-policy>c</think-policy><final>x</final>",
     "out of order"),
    ("hello " + GOOD, "outside the blocks"),
    (GOOD + " trailing", "after </final>"),
    (GOOD.replace("<final>4</final>", "<final>  </final>"), "empty <final>"),
    (GOOD.replace("<think-policy>", "").replace("</think-policy>", ""), "lacks <think-policy>"),
])
def test_malformed_think_samples_say_why_without_quoting(content, why):
    think, message = parse(content)
    assert think is None
    assert why in message
    assert "add two" not in message and "benign" not in message


def test_think_tags_outside_assistant_content_are_malformed():
    record = {"messages": [{"role": "user", "content": GOOD}, {"role": "assistant", "content": "ok"}]}
    assert "belong only in assistant" in validate(record)
    assert "belong only in assistant" in validate({"text": GOOD})
    assert validate({"prompt": "q", "completion": GOOD}) is None
    assert "lacks" in validate({"prompt": "q", "completion": GOOD.replace("<final>", "")})


def test_malformed_think_sample_is_a_bad_line_named_file_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": GOOD}]},
             {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": GOOD.replace("</final>", "")}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples, problems = read_jsonl(str(path))
    assert [s.line for s in samples] == [1]
    assert len(problems) == 1 and str(problems[0]).startswith(f"{path}:2: ")
    assert "</final>" in problems[0].what
