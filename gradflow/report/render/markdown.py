"""The findings' markdown (their docs) for a terminal: headings, paragraphs re-wrapped to its width, lists, code.

It knows only the markdown the rule docs use (## headings, paragraphs, `-` lists, ``` fences, `code`, *em*,
**bold**). rich.markdown would do too, but it pulls in markdown-it and pygments: ~0.2 s on every `explain` in a
terminal, against a 0.5 s budget (SPEC §9).
"""

from __future__ import annotations

import re

from rich.console import Group
from rich.text import Text

from gradflow.report.render.text import Lines

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_ITEM = re.compile(r"^(\s*)[-*] (.*)$")


def inline(text: str, style: str = "") -> Text:
    """`code`, **bold** and *em* as styles; everything else as it is."""
    out = Text(style=style)
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(text[pos:m.start()])
        code, bold, em = m.groups()
        if code is not None:
            out.append(code, style="bold cyan")
        elif bold is not None:
            out.append(bold, style="bold")
        else:
            out.append(em, style="italic")
        pos = m.end()
    out.append(text[pos:])
    return out


def _code(lines: list[str]) -> Text:
    t = Text(no_wrap=True, overflow="ignore")  # code wrapped at the terminal's edge would not paste
    for i, line in enumerate(lines):
        if i:
            t.append("\n")
        code, hash_, comment = line.partition("#") if not line.lstrip().startswith(("'", '"')) else (line, "", "")
        t.append("    " + code, style="cyan")
        if hash_:
            t.append(hash_ + comment, style="dim")
    return t


def render_markdown(doc: str) -> Group:
    """`doc` as rich renderables, one per block, with a blank line between blocks."""
    blocks: list = []
    para: list[str] = []
    items: Lines | None = None
    lines = doc.splitlines()

    def flush():
        nonlocal para, items
        if para:  # re-wrapped to the terminal's width, without trailing spaces
            blocks.append(Lines(indent=0).add(inline(" ".join(s.strip() for s in para)), indent=0))
            para = []
        if items is not None:
            blocks.append(items)
            items = None

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append(_code(lines[i + 1:j]))
            i = j + 1
            continue
        if line.startswith("#"):
            flush()
            blocks.append(Text(line.lstrip("#").strip(), style="bold magenta underline"))
        elif not line.strip():
            flush()
        elif (m := _ITEM.match(line)) is not None:
            if para:
                flush()
            items = items or Lines(indent=4)
            items.add(Text("  • ") + inline(m.group(2)), indent=4)
        elif items is not None and line.startswith("  "):  # a list item's continuation line
            last, indent = items.items[-1]
            last[-1] = last[-1] + Text(" ") + inline(line.strip())
        else:
            if items is not None:
                flush()
            para.append(line)
        i += 1
    flush()
    parts: list = []
    for block in blocks:
        if parts:
            parts.append(Text(""))
        parts.append(block)
    return Group(*parts)
