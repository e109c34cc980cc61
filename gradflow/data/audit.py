"""Per-sample audit records and previews: ids, thinking hashes and token counts, never the thinking text."""

from __future__ import annotations

from gradflow.data.think import has_think_tags


def preview(sample, think, text_width: int = 80) -> str:
    """One line per sample: <final> and thinking hashes for /think samples, else the start of its target.

    Raw text that holds anything tag-like is never shown, whatever the validation let through.
    """
    if think is not None:
        return think.preview(text_width)
    record = sample.record
    if sample.kind == "messages":
        target = next((m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant"), "")
    elif sample.kind == "prompt":
        target = record["completion"]
    else:
        target = record["text"]
    if has_think_tags(target):
        return "(withheld: the text holds a /think-like tag)"
    # cut before split(): a 50 MB line must not be split whole for an 80-character preview
    text = " ".join(target[: text_width * 8].split())
    return repr(text if len(text) <= text_width else text[: text_width - 1] + "…")
