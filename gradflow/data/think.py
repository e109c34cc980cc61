"""/think samples: validation of the four blocks, and the hash that stands in for the thinking text.

The assistant content (or a completion) holds `<think-task>`, `<think-safety>`, `<think-policy>`, then `<final>`,
each closed, once, in that order. Tags match in any case, with whitespace inside the brackets (`<THINK-TASK>`,
`<think-task >`, `</ think-task>`). Anything else that looks like a think tag (`<think_task>`, `<thinktask>`,
`<think>`, an unclosed `<think-task`) makes the content malformed, so that near-misses are refused rather than
treated, and previewed, as plain text. Look-alikes count too: tag-likeness is judged on the text normalised
(`normalise`: `\\u`/`\\x` escapes and HTML entities decoded, NFKC, invisible format characters dropped, single
angle quotes and angle brackets read as `<`/`>` where a name follows them directly, Cyrillic and Greek letters
that look Latin read as Latin), so `&#60;think-task&#62;`, `<` + U+200B + `think-task>`, `<тhink-тask>` or
`‹think-task›` are refused like `<think_task>`, while quoted prose (`le « final »`, `‹ final ›`) is not a tag.
The thinking text itself never leaves this module: callers get the `<final>` text and the SHA-256 hex of
`"\\n".join(stripped task, safety, policy)`, one per assistant turn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import unicodedata

BLOCKS = ("think-task", "think-safety", "think-policy", "final")
TAGS = tuple(t for b in BLOCKS for t in (f"<{b}>", f"</{b}>"))
# A /think tag: any case, whitespace allowed inside the brackets.
_TAG = re.compile(r"<\s*(/?)\s*(think-task|think-safety|think-policy|final)\s*>", re.IGNORECASE)
# What looks like one: '<' (or '&lt;', fullwidth '＜') then 'think…', bracket closed or not, or a bracketed
# 'final…'. A bare '< final' is left alone: `x < final_count` is ordinary code.
# (One branch after a shared prefix: an alternation of whole patterns scans a 50 MB line six times slower.)
_LOOKS = re.compile(r"(?:<|&lt;|＜)\s*/?\s*(?:think|final[^<>]{0,32}(?:>|&gt;|＞))", re.IGNORECASE)


# before tag matching: escapes, invisible characters, bracket and letter look-alikes (NFKC already folds fullwidth,
# small-form and mathematical letters and brackets)
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})")
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]")
# (not the double guillemets « »: quotation marks in French or German prose, never a tag's bracket)
_LOOK_ALIKES = str.maketrans("‹›⟨⟩〈〉〈〉❬❭❮❯˂˃ᐸᐳ"
                             "аеорсухіјѕкнптАВЕКМНОРСТХІЅαεικνορτυχΑΒΕΗΙΚΜΝΟΡΤΥΧ",
                             "<><><><><><><><>"
                             "aeopcyxijskhntABEKMHOPCTXISaeikvoptuxABEHIKMNOPTYX")


# how a refusal names the look-alike case (the train hint for --think-lenient looks for it)
LOOK_ALIKE = "written with look-alike letters or brackets, invisible characters or escapes"
_LOOK_OPENERS = "‹⟨〈〈❬❮˂ᐸ"
# the stretch a tag could stand in: after '<' (spaces allowed, as in a real tag), or after a look-alike opener that
# a name (or '/') follows at once: `‹ final ›`, a quotation, is left alone
_AFTER_OPENER = re.compile(f"(?:<\\s*/?\\s*|[{_LOOK_OPENERS}]/?(?=\\S))[^<{_LOOK_OPENERS}]{{0,64}}")


def normalise(text: str) -> str:
    """`text` as tag matching sees it (the module's docstring says how); ASCII text without escapes is itself.
    `--think-lenient` trains a near-miss sample's assistant content as this."""
    if text.isascii() and "&" not in text and "\\" not in text:
        return text
    if "\\" in text:
        text = _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), text)
    if "&" in text:
        text = html.unescape(text)
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    # only what follows an opening bracket can make a tag: fold just those stretches (a whole 50 MB line is slow)
    return _AFTER_OPENER.sub(lambda m: m.group(0).translate(_LOOK_ALIKES), text)


@dataclasses.dataclass(frozen=True)
class Think:
    """One parsed /think turn: the final answer, and the hash of the thinking (never the thinking itself)."""

    final: str
    sha256: str

    def preview(self, width: int = 80) -> str:
        return f"<final> {_clip(self.final, width)!r}  think-sha256 {self.sha256}"


@dataclasses.dataclass(frozen=True)
class ThinkSample:
    """The /think turns of one sample: one entry per assistant turn (or its completion), None for a plain turn."""

    turns: tuple[Think | None, ...]

    @property
    def sha256(self) -> list[str | None]:
        """One hash per assistant turn, None where a turn holds no /think blocks: what audit.jsonl records."""
        return [t.sha256 if t is not None else None for t in self.turns]

    @property
    def final(self) -> str:
        """The `<final>` text of the last /think turn."""
        return [t for t in self.turns if t is not None][-1].final

    def preview(self, width: int = 80) -> str:
        hashes = [h for h in self.sha256 if h]
        many = f" ({len(hashes)} turns)" if len(hashes) > 1 else ""
        return f"<final> {_clip(self.final, width)!r}  think-sha256 {', '.join(hashes)}{many}"


def _clip(text: str, width: int) -> str:
    # cut before split(): a 50 MB field must not be split whole for an 80-character preview
    text = " ".join(text[: width * 8].split())
    return text if len(text) <= width else text[: width - 1] + "…"


def has_think_tags(text: str) -> bool:
    """True when `text` holds a /think tag or anything that looks like one (look-alikes included), so it must be a
    well-formed sample."""
    return bool(_LOOKS.search(text) or _TAG.search(text) or _LOOKS.search(normalise(text)))


def think_hash(task: str, safety: str, policy: str) -> str:
    """SHA-256 hex of the three thinking blocks, stripped and joined by newlines."""
    joined = "\n".join(part.strip() for part in (task, safety, policy))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def parse(text: str) -> tuple[Think | None, str | None]:
    """(Think, None) for a well-formed sample, else (None, why). `why` never quotes the text, nor the tag."""
    found = list(_TAG.finditer(text))
    starts = {m.start() for m in found}
    for m in _LOOKS.finditer(text):
        if m.start() not in starts:
            # no quote: an unclosed '<think-task secret ...' would carry the thinking into the message
            return None, (f"/think sample has a tag-like string at character {m.start()} that is not a /think tag "
                          f"(misspelled or unclosed? want {', '.join(TAGS[::2])}, each closed)")
    if sum(1 for _ in _LOOKS.finditer(normalise(text))) > len(found):
        return None, (f"/think sample has a tag-like string that is not a /think tag ({LOOK_ALIKE}? want "
                      f"{', '.join(TAGS[::2])})")
    tags = [(f"<{m.group(1)}{m.group(2).lower()}>", m.start(), m.end()) for m in found]
    for block in BLOCKS:
        for tag in (f"<{block}>", f"</{block}>"):
            count = sum(1 for t, _, _ in tags if t == tag)
            if count == 0:
                return None, f"/think sample lacks {tag}"
            if count > 1:
                return None, f"/think sample has {tag} {count} times (once each)"
    if [t for t, _, _ in tags] != list(TAGS):
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


def canonical(text: str) -> str:
    """`text` with each /think tag written canonically (`< THINK-Task >` → `<think-task>`): what the model trains on.

    A tokenizer's /think special tokens match only the canonical spelling.
    """
    return _TAG.sub(lambda m: f"<{m.group(1)}{m.group(2).lower()}>", text)


def parse_turns(contents: list[str]) -> ThinkSample | None:
    """The /think turns of a sample's assistant contents (already validated), or None when none uses /think."""
    turns = tuple(parse(c)[0] if has_think_tags(c) else None for c in contents)
    return ThinkSample(turns) if any(t is not None for t in turns) else None
