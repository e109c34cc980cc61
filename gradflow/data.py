"""JSONL samples → token batches: `text`, `prompt`/`completion`, or `messages` with the chat template.

Loss is on completion / assistant tokens by default (`loss_on="all"` to change).
"""

from __future__ import annotations

import dataclasses
import json
import os

from gradflow.errors import GradflowError

ROLES = ("system", "user", "assistant")


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


def read_jsonl(path: str) -> tuple[list[Sample], list[Problem]]:
    """Parse and validate every line; malformed lines come back as Problems named file:line."""
    if not os.path.exists(path):
        raise GradflowError(f"data file not found: {path}", "Check the --data path")
    if os.path.isdir(path):
        raise GradflowError(f"--data {path} is a directory", "Pass a .jsonl file")
    samples, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(Problem(path, number, f"not valid JSON ({exc.msg})"))
                continue
            what = validate(record)
            if what:
                problems.append(Problem(path, number, what))
            else:
                samples.append(Sample(number, _kind(record), record))
    if not samples and not problems:
        raise GradflowError(f"data file {path} is empty", "Add JSONL lines with text, prompt/completion or messages")
    return samples, problems


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
            if m.get("role") not in ROLES:
                return f"messages[{i}] has unknown role {m.get('role')!r} (use {', '.join(ROLES)})"
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message: nothing to learn"
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        if not record["completion"]:
            return "'completion' is empty: nothing to learn"
        return None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return "'text' must be a non-empty string"
        return None
    return "needs 'text', 'prompt'/'completion', or 'messages'"


def encode(sample: Sample, tokenizer, seq_len: int, *, loss_on: str = "completion") -> dict:
    """Token ids and labels (-100 where no loss) for one sample, truncated to seq_len."""
    record = sample.record
    if sample.kind == "text":
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        mask = [1] * len(ids)
    elif sample.kind == "prompt":
        p = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        ids = p + c
        mask = [1 if loss_on == "all" else 0] * len(p) + [1] * len(c)
    else:
        ids, mask = _encode_messages(record["messages"], tokenizer, loss_on)
    ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def _encode_messages(messages, tokenizer, loss_on: str):
    if not getattr(tokenizer, "chat_template", None):
        raise GradflowError("the tokenizer has no chat template for 'messages' samples",
                            "Use a tokenizer with a chat template, or text / prompt-completion samples")
    ids, mask = [], []
    # Render turn by turn so the mask follows the roles, whatever the template's generation tags.
    for i in range(len(messages)):
        prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        upto = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        new = upto[len(ids):]
        learn = loss_on == "all" or messages[i]["role"] == "assistant"
        ids.extend(new)
        mask.extend([1 if learn else 0] * len(new))
    return ids, mask


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


def probe_batch(path: str, tokenizer, *, batch_size: int, seq_len: int, device=None) -> dict:
    """The first `batch_size` samples of a JSONL file as a batch; any malformed line is an error."""
    if tokenizer is None:
        raise GradflowError("--data needs a tokenizer, and this model source has none",
                            "Use a preset or a directory with a tokenizer, or return 'tokenizer' from your factory")
    samples, problems = read_jsonl(path)
    if problems:
        raise GradflowError(f"malformed sample at {problems[0]}", "Fix or remove that line")
    rows = [encode(s, tokenizer, seq_len) for s in samples[:batch_size]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate(rows, pad, device)
