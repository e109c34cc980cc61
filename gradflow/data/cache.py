"""Caches across runs, under one root: tokenised data keyed by a content hash, and the compile cache's directory.

The root: $GRADFLOW_CACHE_DIR, else $XDG_CACHE_HOME/gradflow, else ~/.cache/gradflow. GRADFLOW_NO_CACHE=1 (or
`gradflow train --no-cache`) turns both off.

Tokenised data: `data/<key>.json`, where the key hashes everything the encoded rows depend on: the data file's bytes
(a pipe's spooled copy: gradflow.data.jsonl.read_once), the name it was given (sample ids and skipped-line messages
carry it), the tokenizer (class, vocabulary and merges, chat template, special tokens), the options that shape
encoding, the transformers version, and the source of gradflow's encoding code, so that a change to any of them is a
miss, never stale rows. Entries are JSON (no pickle: nothing in the cache runs code) written atomically, the
directory private (0700): the data may be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from gradflow.files import write_atomic

FORMAT = 1  # bump when an entry's layout changes
_ENCODING_CODE = ("jsonl.py", "think.py", "audit.py", "packing.py")  # the data layer's code that shapes the rows


def enabled() -> bool:
    return os.environ.get("GRADFLOW_NO_CACHE", "") in ("", "0")


def root() -> str:
    """gradflow's cache directory (not created here)."""
    if os.environ.get("GRADFLOW_CACHE_DIR"):
        return os.environ["GRADFLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradflow")


def compile_dir() -> str:
    """Where inductor keeps compiled kernels across runs: $TORCHINDUCTOR_CACHE_DIR when the user set it, else
    <root>/inductor (torch's own default is under /tmp, which a reboot or a fresh container empties)."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(root(), "inductor")


def tokenizer_identity(tokenizer) -> str:
    """A hash of what decides how `tokenizer` encodes: class, vocabulary and rules, chat template, special tokens."""
    digest = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())  # vocabulary, merges, normaliser, pre-tokeniser, post-processor
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    specials = {name: str(getattr(tokenizer, name, None)) for name in
                ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
                 "padding_side", "truncation_side", "model_max_length")}
    specials["added"] = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or [])
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()


def _code_hash(extra: tuple[str, ...]) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for path in [os.path.join(here, name) for name in _ENCODING_CODE] + list(extra):
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()


def data_key(data_sha256: str, name: str, tokenizer, options: dict, code: tuple[str, ...] = ()) -> str:
    """The key of a tokenised data set: see the module docstring. `code`: more source files that shape the rows."""
    import transformers

    parts = {"format": FORMAT, "data": data_sha256, "name": name, "tokenizer": tokenizer_identity(tokenizer),
             "options": options, "transformers": transformers.__version__, "code": _code_hash(code)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _entry(key: str) -> str:
    return os.path.join(root(), "data", f"{key}.json")


def load(key: str) -> dict | None:
    """The entry stored under `key`, or None (absent, unreadable or damaged: a miss, never an error)."""
    try:
        with open(_entry(key), encoding="utf-8") as fh:
            entry = json.load(fh)
    except (OSError, ValueError):
        return None
    return entry.get("payload") if isinstance(entry, dict) and entry.get("key") == key else None


def store(key: str, payload: dict) -> str | None:
    """Write `payload` under `key` atomically; the entry's path, or None when the cache cannot be written (a
    read-only home, a full disk: the run goes on without it)."""
    path = _entry(key)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # private: the data may be
        write_atomic(path, lambda fh: json.dump({"key": key, "payload": payload}, fh, ensure_ascii=False,
                                                separators=(",", ":")))
    except OSError:
        return None
    return path
