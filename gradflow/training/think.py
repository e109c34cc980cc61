"""/think samples: validation of the four blocks, and the hash that stands in for the thinking text.

The assistant content (or a completion) holds `<think-task>`, `<think-safety>`, `<think-policy>`, then `<final>`,
each closed, once, in that order. The thinking text itself never leaves this module: callers get the `<final>`
text and the SHA-256 hex of `"\\n".join(stripped task, safety, policy)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

BLOCKS = ("think-task", "think-safety", "think-policy", "final")
TAGS = tuple(t for b in BLOCKS for t in (f"<{b}>", f"</{b}>"))
_TAG = re.compile(r"</?(?:think-task|think-safety|think-policy|final)>")


@dataclasses.dataclass(frozen=True)
class Think:
    """A parsed /think sample: the final answer, and the hash of the thinking (never the thinking itself)."""

    final: str
    sha256: str

    def preview(self, width: int = 80) -> str:
        text = " ".join(self.final.split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        return f"<final> {text!r}  think-sha256 {self.sha256}"


def has_think_tags(text: str) -> bool:
    """True when `text` uses any /think tag, so it must be a well-formed /think sample."""
    return bool(_TAG.search(text))


def think_hash(task: str, safety: str, policy: str) -> str:
    """SHA-256 hex of the three thinking blocks, stripped and joined by newlines."""
    joined = "\n".join(part.strip() for part in (task, safety, policy))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def parse(text: str) -> tuple[Think | None, str | None]:
    """(Think, None) for a well-formed sample, else (None, why). `why` never quotes the text."""
    tags = [(m.group(0), m.start(), m.end()) for m in _TAG.finditer(text)]
    for block in BLOCKS:
        for tag in (f"<{block}>", f"</{block}>"):
            count = sum(1 for t, _, _ in tags if t == tag)
            if count == 0:
                return None, f"/think sample lacks {tag}"
            if count > 1:
                return None, f"/think sample has {tag} {count} times (once each)"
    expected = [t for b in BLOCKS for t in (f"<{b}>", f"</{b}>")]
    if [t for t, _, _ in tags] != expected:
        return None, "/think blocks are out of order or nested (want think-task, think-safety, think-policy, final)"
    parts, last_end = [], 0
    for i in range(0, len(tags), 2):
        (_, open_start, open_end), (_, close_start, close_end) = tags[i], tags[i + 1]
        if text[last_end:open_start].strip():
            return None, f"/think sample has text outside the blocks (before {tags[i][0]})"
        parts.append(text[open_end:close_start])
        last_end = close_end
    if text[last_end:].strip():
        return None, "/think sample has text after </final>"
    task, safety, policy, final = parts
    if not final.strip():
        return None, "/think sample has an empty <final>"
    return Think(final=final.strip(), sha256=think_hash(task, safety, policy)), None
