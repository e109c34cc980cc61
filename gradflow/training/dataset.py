"""The training data: JSONL read and encoded (loss on assistant/completion tokens, /think validated), then served
packed (padding-free token-budget batches, the default) or padded to each batch's longest row (--no-packing).

Packed: the dataset is a list of groups of rows (gradflow.data.packing.pack_groups), one group per step
(per_device_train_batch_size=1); the collator concatenates a group into one [1, T] row whose position ids restart
at every sample and whose first label of each sample is -100. There is no attention mask: transformers builds the
block-diagonal causal mask from the restarting position ids (a model with a cache would not: use_cache is off).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gradflow.data import cache
from gradflow.data.audit import preview
from gradflow.data.jsonl import (Problem, collate, encode, given_name, read_jsonl, sample_id, supervised_count,
                                 think_of)
from gradflow.data.think import LOOK_ALIKE
from gradflow.data.packing import PackedCollator, batch_of, pack_groups
from gradflow.errors import GradflowError


@dataclasses.dataclass
class Prepared:
    rows: list[dict]
    audit: list[dict]
    previews: list[dict]
    problems: list[Any]
    samples: int


def read_data(path: str, opts):
    """Read and validate the JSONL file (no tokenizer needed): fails early on --strict or no usable line."""
    samples, problems = read_jsonl(path, think_lenient=opts.think_lenient)
    if problems and opts.strict:
        raise GradflowError(f"malformed sample at {problems[0]}"
                            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}",
                            "Fix or remove those lines, or run without --strict to skip them")
    if not samples:
        look_alikes = not opts.think_lenient and any(LOOK_ALIKE in p.what for p in problems)
        raise GradflowError(f"every line of {given_name(path)} is malformed ({len(problems)}); first: {problems[0]}",
                            "Fix the data: each line needs text, prompt/completion, or messages" + (
                                " (or pass --think-lenient to train /think tags written with look-alikes)"
                                if look_alikes else ""))
    return samples, problems


def prepare_data(path: str, tokenizer, opts, read=None) -> Prepared:
    """Read, validate and encode the JSONL file; bad lines become Problems (or an error with --strict)."""
    samples, problems = read if read is not None else read_data(path, opts)
    if tokenizer is None:
        raise GradflowError("training on --data needs a tokenizer, and this model source has none",
                            "Use a preset or a directory with a tokenizer, or return 'tokenizer' from your factory")
    rows, audit, previews, too_short = [], [], [], []
    for sample in samples:
        row = encode(sample, tokenizer, opts.seq_len, loss_on=opts.loss_on)
        supervised = supervised_count(row["labels"])
        think = think_of(sample)
        sid = sample_id(sample, path)
        if supervised == 0:
            too_short.append(Problem(path, sample.line, f"--seq-len {opts.seq_len} leaves no supervised token "
                                                        f"(the prompt fills it)"))
            continue
        rows.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        audit.append({"id": sid, "line": sample.line, "think_sha256": think.sha256 if think else None,
                      "tokens": len(row["input_ids"]), "supervised_tokens": supervised,
                      "tokens_before_truncation": row["full_length"],
                      "truncated": row["full_length"] > len(row["input_ids"])})
        if len(previews) < opts.previews:
            previews.append({"id": sid, "preview": preview(sample, think)})
    if too_short and opts.strict:
        raise GradflowError(f"{too_short[0]}", "Raise --seq-len, or shorten the prompts")
    if not rows:
        cap = 4096  # enough to suggest a --seq-len; a 50 MB line is not tokenised whole for a hint
        longest = max(len(encode(s, tokenizer, cap, loss_on=opts.loss_on)["input_ids"]) for s in samples)
        size = f"{longest}{'+' if longest >= cap else ''}"
        raise GradflowError(f"--seq-len {opts.seq_len} is shorter than the prompt of every sample in {path}: "
                            f"no supervised token is left (longest sample {size} tokens)",
                            f"Raise --seq-len (e.g. --seq-len {min(longest, cap)})")
    return Prepared(rows=rows, audit=audit, previews=previews, problems=problems + too_short, samples=len(samples))


def cached_prepare(path: str, tokenizer, opts, read, *, data_sha256: str, use_cache: bool = True
                   ) -> tuple[Prepared, dict]:
    """prepare_data through the tokenised-data cache (gradflow.data.cache): (prepared, {"status": hit | miss | off}).
    `data_sha256`: the bytes `read` came from (the run's fingerprint hashes them once for both)."""
    if not use_cache or not cache.enabled() or tokenizer is None:
        return prepare_data(path, tokenizer, opts, read), {"status": "off"}
    options = {"seq_len": opts.seq_len, "loss_on": opts.loss_on, "think_lenient": opts.think_lenient,
               "strict": opts.strict, "previews": opts.previews}
    key = cache.data_key(data_sha256, path, tokenizer, options, code=(os.path.abspath(__file__),))
    entry = cache.load(key)
    if entry is not None:
        try:
            return _from_entry(entry), {"status": "hit"}
        except (KeyError, TypeError, ValueError):
            pass  # a damaged entry: encode again, and overwrite it
    prepared = prepare_data(path, tokenizer, opts, read)
    stored = cache.store(key, _to_entry(prepared))
    return prepared, {"status": "miss" if stored else "miss (not stored: the cache directory is not writable)"}


def _to_entry(prepared: Prepared) -> dict:
    problems = [dataclasses.asdict(p) for p in prepared.problems]
    return {"rows": prepared.rows, "audit": prepared.audit, "previews": prepared.previews, "problems": problems,
            "samples": prepared.samples}


def _from_entry(entry: dict) -> Prepared:
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in entry["rows"]]
    problems = [Problem(p["path"], int(p["line"]), p["what"]) for p in entry["problems"]]
    return Prepared(rows=rows, audit=list(entry["audit"]), previews=list(entry["previews"]), problems=problems,
                    samples=int(entry["samples"]))


class Collator:
    """Pads each batch to its longest row (not to --seq-len) and counts the tokens it has served."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, rows):
        batch = collate(rows, self.pad_id)
        self.tokens += int(batch["attention_mask"].sum())  # on the CPU, before the batch moves: no sync
        return batch


class GroupCollator:
    """Packs the groups of rows a dataloader hands over (one group per step) into one padding-free row."""

    def __init__(self):
        self.packed = PackedCollator()

    @property
    def tokens(self) -> int:
        return self.packed.tokens

    def __call__(self, groups):
        return self.packed([row for group in groups for row in group])


def packed_groups(rows: list[dict], tokens_per_batch: int, seed: int) -> list[list[dict]]:
    """Rows packed into groups of at most `tokens_per_batch` tokens (each row whole), the same for the same seed."""
    groups = pack_groups([len(r["input_ids"]) for r in rows], tokens_per_batch, seed=seed)
    return [[rows[i] for i in group] for group in groups]


def train_dataset(prepared: Prepared, opts, pad_id: int, tokens_per_batch: int | None):
    """(dataset, collator): packed groups with a GroupCollator, or the rows with a padding Collator."""
    if not opts.packing:
        return prepared.rows, Collator(pad_id)
    return packed_groups(prepared.rows, tokens_per_batch, opts.seed), GroupCollator()


def probe_batch(prepared: Prepared, opts, pad_id: int, device, rank: int = 0):
    """The pre-flight's batch, as training will shape it: the first --batch-size samples (at least two when
    packing, so that a packed batch has a boundary to check), packed or padded. Under torchrun, rank r takes the
    r-th such slice of the data (wrapping around), so that every rank probes samples of its own."""
    n = max(2, opts.batch_size) if opts.packing else opts.batch_size
    start = (rank * n) % len(prepared.rows)
    rows = (prepared.rows[start:] + prepared.rows[:start])[:n]
    return batch_of(rows, packed=opts.packing, pad_id=pad_id, device=device)
