"""/think samples: the four blocks, once each, in order; the hash per assistant turn; near-misses refused as bad
lines; and the thinking never printed, through the library and the real CLI."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from gradflow.data.jsonl import Sample, _kind, encode, read_jsonl, think_of, validate
from gradflow.errors import GradflowError
from gradflow.setup.presets import build_tokenizer
from gradflow.data.audit import preview as audit_preview
from gradflow.training.engine import TrainOptions, prepare_data
from gradflow.data.think import parse, think_hash
from tests.helpers.cli import gradflow

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


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


# ----- near-misses: case and spacing parse; anything else tag-like is refused, and never quoted --------------
SECRET = "SECRET-THOUGHT-51c2e"


def _content(task="<think-task>", end_task="</think-task>", safety="<think-safety>", policy="<think-policy>",
             final="<final>", secret=SECRET):
    return (f"{task}{secret} task{end_task}{safety}{secret} safety</think-safety>"
            f"{policy}{secret} policy</think-policy>{final}the answer</final>")


CANONICAL_HASH = think_hash(f"{SECRET} task", f"{SECRET} safety", f"{SECRET} policy")

ACCEPTED = {
    "upper case": re.sub(r"</?[a-z-]+>", lambda m: m.group(0).upper(), _content()),
    "mixed case": _content(task="<Think-Task>", end_task="</THINK-task>", final="<FINAL>"),
    "space before >": _content(task="<think-task >", safety="<think-safety\n>"),
    "space after < and /": _content(task="< think-task>", end_task="</ think-task >", policy="<\tthink-policy>"),
}

REFUSED = {
    "underscore": (_content(task="<think_task>", end_task="</think_task>"), "not a /think tag"),
    "no hyphen": (_content(task="<thinktask>", end_task="</thinktask>"), "not a /think tag"),
    "misspelled block": (_content(safety="<think-safty>"), "not a /think tag"),
    "plain <think>": (f"<think>{SECRET}</think>the answer", "not a /think tag"),
    "bracket left open": (_content(task="<think-task "), "not a /think tag"),
    "html entity": (_content(task="&lt;think-task&gt;"), "not a /think tag"),
    "extra text in final tag": (_content(final="<final answer>"), "not a /think tag"),
    "wrong order, upper case": (f"<THINK-SAFETY>{SECRET}</THINK-SAFETY><THINK-TASK>{SECRET}</THINK-TASK>"
                                f"<THINK-POLICY>{SECRET}</THINK-POLICY><FINAL>a</FINAL>", "out of order"),
    "duplicated by case": (_content().replace("<final>", f"<THINK-TASK>{SECRET}</Think-Task><final>"),
                           "2 times"),
    "unclosed, upper case": (re.sub(r"</?[a-z-]+>", lambda m: m.group(0).upper(),
                                    _content().replace("</think-policy>", "")), "lacks </think-policy>"),
}


def _every_tag(open_: str, close: str = "", inside=lambda name: name) -> str:
    """_content() with every tag written another way: `open_`/`close` for the brackets, `inside` for the name."""
    return re.sub(r"<(/?)([a-z-]+)>", lambda m: f"{open_}{m.group(1)}{inside(m.group(2))}{close}", _content())


# issue 21: forms that read as /think tags to a person or a tokenizer, but were taken as plain text
LOOK_ALIKES = {
    "decimal entities": _every_tag("&#60;", "&#62;"),
    "hex entities": _every_tag("&#x3c;", "&#x3e;"),
    "zero-width space after <": _every_tag("<\u200b", ">"),
    "zero-width joiner after <": _every_tag("<\u200d", ">"),
    "word joiner inside the name": _every_tag("<", ">", lambda n: n.replace("k", "\u2060k").replace("l", "\u2060l")),
    "right-to-left override": _every_tag("<\u202e", ">"),
    "cyrillic look-alikes": _every_tag("<", ">", lambda n: n.replace("t", "т").replace("a", "а").replace("i", "і")),
    "small angle brackets": _every_tag("\ufe64", "\ufe65"),
    "fullwidth angle brackets": _every_tag("\uff1c", "\uff1e"),
    "single angle quotes": _every_tag("‹", "›"),
    "math angle brackets": _every_tag("⟨", "⟩"),
    "backslash-u escapes": _every_tag("\\u003c", "\\u003e"),
    "one look-alike among real tags": _content(task="<тhink-тask>", end_task="</тhink-тask>"),
}
REFUSED.update({name: (content, "not a /think tag") for name, content in LOOK_ALIKES.items()})


@pytest.mark.parametrize("content", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_tags_match_in_any_case_with_spaces_inside_the_brackets(content):
    think, why = parse(content)
    assert why is None
    assert think.final == "the answer" and think.sha256 == CANONICAL_HASH
    assert SECRET not in think.preview()


@pytest.mark.parametrize("content, why", REFUSED.values(), ids=REFUSED.keys())
def test_near_miss_tags_are_refused_without_quoting(content, why):
    think, message = parse(content)
    assert think is None and why in message
    assert SECRET not in message
    line = validate({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]})
    assert why in line and SECRET not in line


@pytest.mark.parametrize("role, content", [("user", f"<Think-Task>{SECRET}</Think-Task>"),
                                           ("system", f"<think_task>{SECRET}"), ("user", f"< think >{SECRET}")])
def test_tag_like_strings_outside_assistant_content_are_refused(role, content):
    line = validate({"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "ok"}]})
    assert "belong only in assistant" in line and SECRET not in line
    assert "belong only in assistant" in validate({"text": content})


def test_ordinary_angle_brackets_are_not_tags():
    for text in ("if x < final_count: stop", "a <b>bold</b> word", "I think <so>", "x<y and y > z",
                 "le mot « final » de la série", "das »finale« Wort", "ein ‹ final › Wort, ‹ think › es"):
        assert validate({"prompt": "q", "completion": text}) is None


def _sample(record, line=1):
    return Sample(line, _kind(record), record)


def test_every_assistant_turn_is_hashed_in_order():
    second = _content(secret="other")
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": _content()},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "plain reply"},
                           {"role": "user", "content": "q3"}, {"role": "assistant", "content": second}]}
    assert validate(record) is None
    think = think_of(_sample(record))
    other_hash = think_hash("other task", "other safety", "other policy")
    assert think.sha256 == [CANONICAL_HASH, None, other_hash]
    line = audit_preview(_sample(record), think)
    assert CANONICAL_HASH in line and other_hash in line and "(2 turns)" in line and SECRET not in line
    assert think_of(_sample({"prompt": "q", "completion": _content()})).sha256 == [CANONICAL_HASH]
    assert think_of(_sample({"messages": [{"role": "assistant", "content": "no thinking"}]})) is None


def test_a_malformed_earlier_turn_refuses_the_sample():
    record = {"messages": [{"role": "user", "content": "q1"},
                           {"role": "assistant", "content": _content(task="<think_task>")},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": _content()}]}
    line = validate(record)
    assert line.startswith("messages[1]: ") and SECRET not in line


def test_previews_withhold_raw_text_that_holds_a_tag_like_string():
    # validation refuses such samples; the preview must hold even if one got through
    for record in ({"text": f"<think>{SECRET}</think>"}, {"prompt": "q", "completion": f"<THINK_TASK>{SECRET}"},
                   {"messages": [{"role": "assistant", "content": f"&lt;think-task&gt;{SECRET}"}]}):
        line = audit_preview(_sample(record), None)
        assert SECRET not in line and "withheld" in line


def test_case_variants_train_on_the_canonical_tags(tok):
    canonical_row = encode(_sample({"prompt": "q", "completion": _content()}), tok, 256)
    for content in ACCEPTED.values():
        row = encode(_sample({"prompt": "q", "completion": content}), tok, 256)
        assert row["input_ids"] == canonical_row["input_ids"]  # the tokenizer's /think special tokens


def _near_miss_file(tmp_path):
    """Good samples (canonical, case and space variants, multi-turn), then every refused variant."""
    def chat(*assistant):
        messages = []
        for i, content in enumerate(assistant):
            messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": content}]
        return {"messages": messages}

    good = [chat(_content()), *(chat(c) for c in ACCEPTED.values()), chat(_content(), _content(secret="x"))]
    bad = [chat(c) for c, _ in REFUSED.values()]
    path = tmp_path / "near.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return str(path), len(good), len(bad)


def test_read_and_prepare_never_carry_the_thinking(tmp_path, tok):
    path, n_good, n_bad = _near_miss_file(tmp_path)
    prepared = prepare_data(path, tok, TrainOptions(seq_len=64, previews=100))
    assert len(prepared.rows) == n_good
    assert [str(p).split(": ")[0] for p in prepared.problems] == [f"{path}:{n_good + 1 + i}" for i in range(n_bad)]
    shown = json.dumps([str(p) for p in prepared.problems] + prepared.previews + prepared.audit)
    assert SECRET not in shown
    assert [a["think_sha256"] for a in prepared.audit[:n_good - 1]] == [[CANONICAL_HASH]] * (n_good - 1)
    assert prepared.audit[-1]["think_sha256"] == [CANONICAL_HASH, think_hash("x task", "x safety", "x policy")]


@pytest.mark.slow
def test_train_cli_refuses_near_misses_and_never_prints_the_thinking(tmp_path):
    path, n_good, n_bad = _near_miss_file(tmp_path)
    out = tmp_path / "run"
    run = gradflow("train", "tiny-phi3", "--data", path, "--output", out, "--max-steps", "1", "--seq-len", "64",
                   "--gc", "off")
    assert run.code == 0, run.stderr[-3000:]
    assert SECRET not in run.stdout and SECRET not in run.stderr
    assert f"near.jsonl:{n_good + 1}: " in run.stderr and "not a /think tag" in run.stderr
    assert CANONICAL_HASH in run.stderr  # the preview of the first sample
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"report.json", "audit.jsonl"} <= {p.name for p in written}
    for p in written:
        blob = p.read_bytes()
        for encoding in ("utf-8", "utf-16-le"):
            assert SECRET.encode(encoding) not in blob, p
    report = json.loads((out / "report.json").read_text())
    assert [s.split(": ")[0] for s in report["data"]["skipped"]] == [f"{path}:{n_good + 1 + i}"
                                                                     for i in range(n_bad)]
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert [len(a["think_sha256"]) for a in audit] == [1] * (n_good - 1) + [2]


def test_an_id_that_holds_thinking_is_not_printed_nor_written(tmp_path, tok):
    """A sample's own 'id' names it in previews, audit.jsonl and report.json; one that is /think-like (look-alikes
    included), too long or not printable gives way to file:line (issue 21)."""
    ids = [f"<think-task>{SECRET}", f"‹think-task›{SECRET}", "x" * 129, f"a\x1b[2J{SECRET}", "ok-7", 12]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "q", "completion": "a"}) + "\n" for i in ids))
    prepared = prepare_data(str(path), tok, TrainOptions(seq_len=64, previews=100))
    assert [a["id"] for a in prepared.audit] == ["ids.jsonl:1", "ids.jsonl:2", "ids.jsonl:3", "ids.jsonl:4",
                                                   "ok-7", "12"]
    assert SECRET not in json.dumps(prepared.previews + prepared.audit)


def test_think_lenient_trains_look_alike_tags_as_normalised_and_never_prints_them(tmp_path, tok):
    """--think-lenient: a sample whose tags are look-alikes, well-formed once normalised, is kept as a /think
    sample (hashed; the preview shows <final> and the hash); one that is malformed even then is still a bad line,
    and tags outside assistant content are still refused (issue 21)."""
    lenient = TrainOptions(seq_len=128, previews=100, think_lenient=True)
    kept = [LOOK_ALIKES["cyrillic look-alikes"], LOOK_ALIKES["zero-width space after <"],
            LOOK_ALIKES["decimal entities"]]
    broken = _every_tag("‹", "›").replace("‹/final›", "")  # no </final>, normalised or not
    lines = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]} for c in kept]
    lines += [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": broken}]},
              {"messages": [{"role": "user", "content": LOOK_ALIKES["cyrillic look-alikes"]},
                            {"role": "assistant", "content": "ok"}]}]
    path = tmp_path / "lenient.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(GradflowError, match="every line of .* is malformed") as refused:  # without the flag
        prepare_data(str(path), tok, TrainOptions(seq_len=128))
    assert "pass --think-lenient" in str(refused.value) and SECRET not in str(refused.value)
    prepared = prepare_data(str(path), tok, lenient)
    assert len(prepared.rows) == len(kept)
    assert [a["think_sha256"] for a in prepared.audit] == [[CANONICAL_HASH]] * len(kept)
    assert [p.line for p in prepared.problems] == [4, 5]
    shown = json.dumps([str(p) for p in prepared.problems] + prepared.previews + prepared.audit)
    assert SECRET not in shown and "the answer" in shown
    learned = tok.decode(prepared.rows[0]["input_ids"])
    assert "<think-task>" in learned and "тhink" not in learned  # trained with the tags written canonically
