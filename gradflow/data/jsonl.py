"""JSONL samples → token batches: `text`, `prompt`/`completion`, or `messages` with the chat template.

Loss is on completion / assistant tokens by default (`loss_on="all"` to change). Lines must be UTF-8; text far
longer than `seq_len` is cut to `seq_len * CHARS_PER_TOKEN` characters before it reaches the tokenizer.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import tempfile

from gradflow.data.think import canonical, has_think_tags, normalise, parse, parse_turns
from gradflow.errors import GradflowError

ROLES = ("system", "user", "assistant", "tool")  # a tool turn is context, like a user turn: not learned
# Characters per token, as a generous bound: vocabularies average about 4 per token, so a field cut to
# seq_len * CHARS_PER_TOKEN characters keeps its first seq_len tokens (the cut only moves tokens at its edge, far
# past seq_len), and a 50 MB line costs a 32K-character tokenisation at --seq-len 512 instead of minutes. Only text
# made almost wholly of a tokenizer's longest entries (long runs of spaces) could come out shorter than seq_len.
CHARS_PER_TOKEN = 64
# a line nested deeper, or with a longer integer, is a bad line (skipped, or refused with --strict) before anything
# reads it: no sample format nests past 3, and no field holds a number that long
MAX_DEPTH = 64
MAX_DIGITS = 30
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclasses.dataclass
class Sample:
    line: int
    kind: str  # text | prompt | messages
    record: dict


@dataclasses.dataclass
class Problem:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


_NAMES: dict[str, str] = {}  # a stream's private copy → the path it was read from, for messages


def read_once(path: str) -> str:
    """`path` when it is a regular file; a pipe or other stream (`--data <(cmd)`) is read once, into a private
    temporary file removed at exit, whose path the caller then reads as often as it needs: every read, and a run's
    data hash, see the same bytes. Messages about the copy name `path` (see `read_jsonl`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path  # read_jsonl names what is wrong
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return path
    fd, copy = tempfile.mkstemp(prefix="gradflow-data-", suffix=".jsonl")  # mode 0600: the data may be private
    atexit.register(_remove, copy)
    with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst)
    _NAMES[copy] = path
    return copy


def given_name(path: str) -> str:
    """The path a user gave for `path`, which may be the private copy of a stream (`read_once`)."""
    return _NAMES.get(path, path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_jsonl(path: str, *, think_lenient: bool = False) -> tuple[list[Sample], list[Problem]]:
    """Parse and validate every line; malformed lines come back as Problems named file:line (by the name given,
    for a stream read once). `think_lenient`: a sample whose /think tags are written with look-alikes, and which is
    well-formed once normalised (gradflow.data.think.normalise), is kept with its assistant content normalised."""
    path = read_once(path)
    shown = given_name(path)
    if not os.path.exists(path):
        raise GradflowError(f"data file not found: {shown}", "Check the --data path")
    if os.path.isdir(path):
        raise GradflowError(f"--data {shown} is a directory", "Pass a .jsonl file")
    samples, problems = [], []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                # strict: invalid bytes are a bad line, not U+FFFD that trains as text; a BOM may start the file
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                problems.append(Problem(shown, number, f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_int=_bounded_int)
            except json.JSONDecodeError as exc:
                problems.append(Problem(shown, number, f"not valid JSON ({exc.msg})"))
                continue
            except (RecursionError, _TooLong) as exc:
                problems.append(Problem(shown, number, str(exc) if isinstance(exc, _TooLong) else _TOO_DEEP))
                continue
            if _deeper_than(record, MAX_DEPTH):
                problems.append(Problem(shown, number, _TOO_DEEP))
                continue
            what = _lone_surrogate(record) if _SURROGATE_ESCAPE.search(raw) else None
            what = what or validate(record)
            if what and think_lenient and (lenient := _normalised_think(record)) is not None:
                record, what = lenient, None
            if what:
                problems.append(Problem(shown, number, what))
            else:
                samples.append(Sample(number, _kind(record), record))
    if not samples and not problems:
        raise GradflowError(f"data file {shown} is empty", "Add JSONL lines with text, prompt/completion or messages")
    return samples, problems


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


class _TooLong(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _TooLong(f"holds an integer longer than {MAX_DIGITS} digits")
    return int(text)


def _deeper_than(value, levels: int) -> bool:
    """Whether containers nest more than `levels` deep (it stops looking at that depth)."""
    if not isinstance(value, (dict, list)):
        return False
    if levels == 0:
        return True
    return any(_deeper_than(v, levels - 1) for v in (value.values() if isinstance(value, dict) else value))


def _lone_surrogate(value) -> str | None:
    """A '\\ud800'-style escape with no partner decodes to a string that is not Unicode text: a bad line."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): not valid Unicode"
        return None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        what = _lone_surrogate(item)
        if what:
            return what
    return None


def _kind(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record:
        return "prompt"
    return "text"


def validate(record) -> str | None:
    """Why a record is malformed, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] needs a string 'content'"
            if m.get("role") not in ROLES:  # named, never quoted: a role field may hold anything, thinking included
                return f"messages[{i}] has an unknown role (use {', '.join(ROLES)})"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message: nothing to learn"
        for i, m in enumerate(msgs):
            what = _check_think(m["content"], assistant=m["role"] == "assistant", where=f"messages[{i}]")
            if what:
                return what
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        if not record["completion"]:
            return "'completion' is empty: nothing to learn"
        return (_check_think(record["prompt"], assistant=False, where="'prompt'")
                or _check_think(record["completion"], assistant=True, where="'completion'"))
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return "'text' must be a non-empty string"
        return _check_think(record["text"], assistant=False, where="'text'")
    return "needs 'text', 'prompt'/'completion', or 'messages'"


def _normalised_think(record) -> dict | None:
    """The record with its assistant contents (or completion) normalised, when that makes it a valid sample."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        fixed = {**record, "messages": [{**m, "content": normalise(m["content"])}
                                        if isinstance(m, dict) and m.get("role") == "assistant"
                                        and isinstance(m.get("content"), str) else m for m in record["messages"]]}
    elif isinstance(record.get("completion"), str):
        fixed = {**record, "completion": normalise(record["completion"])}
    else:
        return None
    return fixed if validate(fixed) is None else None


def _check_think(content: str, *, assistant: bool, where: str) -> str | None:
    """/think tags only in assistant content or a completion, and then well-formed. Never quotes the text."""
    if not has_think_tags(content):
        return None
    if not assistant:
        return (f"{where} holds a /think tag or something like one; /think tags belong only in assistant content "
                "or a completion")
    _, why = parse(content)
    return f"{where}: {why}" if why else None


def think_of(sample: Sample):
    """The /think turns of a validated sample (a ThinkSample: one hash per assistant turn), or None."""
    record = sample.record
    if sample.kind == "messages":
        contents = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    elif sample.kind == "prompt":
        contents = [record["completion"]]
    else:
        contents = []
    return parse_turns(contents)


def sample_id(sample: Sample, path: str) -> str:
    """The sample's own 'id' when it has one (a number, or up to 128 characters free of anything /think-like: the id
    is printed, and written to audit.jsonl and report.json), else file:line."""
    given = sample.record.get("id")
    if isinstance(given, int) and not isinstance(given, bool):
        return str(given)
    if isinstance(given, str) and 0 < len(given) <= 128 and given.isprintable() and not has_think_tags(given):
        return given
    return f"{os.path.basename(path)}:{sample.line}"


def encode(sample: Sample, tokenizer, seq_len: int, *, loss_on: str = "completion") -> dict:
    """Token ids and labels (-100 where no loss) for one sample, truncated to seq_len.

    Text is cut to `seq_len * CHARS_PER_TOKEN` characters before tokenisation (`text`; a prompt and a completion
    each; a conversation's contents together, ending at the turn that reaches the bound); `cut` says so, and
    `full_length` then counts the tokens of what was kept, a lower bound. /think tags in assistant content or a
    completion are written canonically.
    """
    record = sample.record
    budget = seq_len * CHARS_PER_TOKEN
    if sample.kind == "text":
        text = record["text"]
        cut = len(text) > budget
        ids = tokenizer(text[:budget], add_special_tokens=False)["input_ids"]
        mask = [1] * len(ids)
    elif sample.kind == "prompt":
        prompt, completion = record["prompt"], record["completion"]
        cut = len(prompt) > budget or len(completion) > budget
        p = tokenizer(prompt[:budget], add_special_tokens=False)["input_ids"]
        c = tokenizer(canonical(completion[:budget]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and len(completion) <= budget:  # EOS only at the real end
            c = c + [tokenizer.eos_token_id]
        ids = p + c
        mask = [1 if loss_on == "all" else 0] * len(p) + [1] * len(c)
    else:
        messages, cut = _cut_messages(record["messages"], budget)
        messages = [{**m, "content": canonical(m["content"])} if m["role"] == "assistant" else m for m in messages]
        ids, mask = _encode_messages(messages, tokenizer, loss_on)
    full = len(ids)
    ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels, "full_length": full, "cut": cut}


def _cut_messages(messages: list[dict], budget: int) -> tuple[list[dict], bool]:
    """The turns that fit in `budget` characters of content, the last one cut to fit; and whether any was dropped."""
    kept, used = [], 0
    for m in messages:
        room = budget - used
        kept.append(m if len(m["content"]) <= room else {**m, "content": m["content"][:room]})
        used += len(m["content"])
        if used >= budget:  # by the assumption behind CHARS_PER_TOKEN, seq_len tokens are already there
            return kept, used > budget or len(kept) < len(messages)
    return kept, False


def supervised_count(labels: list[int]) -> int:
    """Tokens the loss sees: labels after the causal shift that are not -100."""
    return sum(1 for t in labels[1:] if t != -100)


def _encode_messages(messages, tokenizer, loss_on: str):
    if not getattr(tokenizer, "chat_template", None):
        raise GradflowError("the tokenizer has no chat template for 'messages' samples",
                            "Use a tokenizer with a chat template, or text / prompt-completion samples")
    ids, mask = [], []
    # Render turn by turn so the mask follows the roles, whatever the template's generation tags.
    for i in range(len(messages)):
        assistant = messages[i]["role"] == "assistant"
        if assistant and loss_on != "all":
            # the assistant header ('<|assistant|>\n') is prompt: the model should not learn to emit it
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            if header is not None and header[: len(ids)] == ids:
                new = header[len(ids):]
                ids.extend(new)
                mask.extend([0] * len(new))
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        new = upto[len(ids):]
        learn = loss_on == "all" or assistant
        ids.extend(new)
        mask.extend([1 if learn else 0] * len(new))
    return ids, mask


def _render(tokenizer, messages, *, generation_prompt: bool):
    if not messages and not generation_prompt:
        return []
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # a template that cannot render this prefix: fall back to the plain turn split
        return None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate(rows: list[dict], pad_id: int, device=None) -> dict:
    """Pad to the longest row (not to a fixed max length) and build the attention mask."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attn[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def file_rows(path: str, tokenizer, *, count: int, seq_len: int) -> list[dict]:
    """The first `count` samples of a JSONL file, encoded (at most `seq_len` tokens each); a malformed line is an
    error, as is a model source without a tokenizer."""
    if tokenizer is None:
        raise GradflowError("--data needs a tokenizer, and this model source has none",
                            "Use a preset or a directory with a tokenizer, or return 'tokenizer' from your factory")
    samples, problems = read_jsonl(path)
    if problems:
        raise GradflowError(f"malformed sample at {problems[0]}", "Fix or remove that line")
    return [encode(s, tokenizer, seq_len) for s in samples[:count]]
