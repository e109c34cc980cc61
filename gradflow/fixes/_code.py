"""Code for the user to paste, fitted to 80 columns and still the same Python.

A long code line breaks inside its brackets (after a comma or an opening bracket, or before `and` / `or` / `if` /
`else` / `for`), where Python continues a line by itself; a trailing comment moves to its own line above; a comment
wraps at spaces. A token wider than the width (a long string or name) is never split: it stays whole on its own
line. The result parses to the same syntax tree as the input, or the input is kept as it is.
"""

from __future__ import annotations

import ast
import io
import textwrap
import tokenize

WIDTH = 80
_OPEN, _CLOSE = "([{", ")]}"
_BEFORE = {"and", "or", "if", "else", "for"}  # inside brackets a line may break before these words


def fit_code(lines: list[str], width: int = WIDTH) -> list[str]:
    """`lines` of Python (one statement or comment each) with every line fitted to `width` where it can be."""
    out = [piece for line in lines for piece in fit_line(line, width)]
    source, fitted = "\n".join(lines), "\n".join(out)
    try:
        same = ast.dump(ast.parse(source)) == ast.dump(ast.parse(fitted))
    except SyntaxError:  # a fragment (an indented body without its header): judged line by line below
        same = all(_same_fragment(line, fit_line(line, width)) for line in lines)
    return out if same else list(lines)


def fit_comment(text: str, width: int = WIDTH, indent: str = "") -> list[str]:
    """A comment wrapped at spaces (never inside a word), each line starting with `indent# `."""
    body = text.lstrip("#").strip()
    return [f"{indent}# {piece}" for piece in
            textwrap.wrap(body, max(width - len(indent) - 2, 20), break_long_words=False, break_on_hyphens=False)
            or [""]]


def fit_line(line: str, width: int = WIDTH) -> list[str]:
    """One physical line, fitted: the line itself when it fits or cannot be broken safely."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip(" "))]
    if line.lstrip().startswith("#"):
        return fit_comment(line, width, indent)
    tokens = _tokens(line)
    if tokens is None:
        return [line]
    comment = next((t for t in tokens if t.type == tokenize.COMMENT), None)
    if comment is not None:  # the comment goes above the code it describes
        code = line[: comment.start[1]].rstrip()
        return fit_comment(comment.string, width, indent) + fit_line(code, width)
    return _split(line, tokens, indent, width)


def _tokens(line: str):
    try:
        return [t for t in tokenize.generate_tokens(io.StringIO(line.lstrip() + "\n").readline)
                if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def _breaks(tokens) -> list[int]:
    """Columns (in the stripped line) where a new line may start: inside brackets only, so Python joins them."""
    depth, cuts = 0, []
    for i, t in enumerate(tokens):
        if t.type == tokenize.OP and t.string in _CLOSE:
            depth -= 1
        if depth > 0 and t.type == tokenize.NAME and t.string in _BEFORE and i > 0:
            cuts.append(t.start[1])
        if t.type == tokenize.OP and t.string in _OPEN:
            depth += 1
            if i + 1 < len(tokens) and tokens[i + 1].string not in _CLOSE:
                cuts.append(tokens[i + 1].start[1])
        elif depth > 0 and t.type == tokenize.OP and t.string == "," and i + 1 < len(tokens) \
                and tokens[i + 1].string not in _CLOSE:
            cuts.append(tokens[i + 1].start[1])
    return sorted(set(cuts))


def _split(line: str, tokens, indent: str, width: int) -> list[str]:
    """Greedy: each line takes as much as fits, and breaks at the last place allowed before the edge."""
    text = line.lstrip(" ")
    cuts = _breaks(tokens)
    if not cuts:
        return [line]
    # continuation lines: one level deeper, two where the statement opens a block (kept apart from its body)
    more = indent + " " * (8 if text.rstrip().endswith(":") else 4)
    out, start, lead = [], 0, indent
    while len(lead) + len(text) - start > width:
        room = width - len(lead)
        fitting = [c for c in cuts if start < c and c - start <= room]
        cut = fitting[-1] if fitting else next((c for c in cuts if c > start), None)
        if cut is None:  # nothing left to break at: the rest stays whole
            break
        out.append(lead + text[start:cut].rstrip())
        start, lead = cut, more
    out.append(lead + text[start:])
    return out


def _same_fragment(line: str, pieces: list[str]) -> bool:
    """For a line that does not parse alone: the pieces hold the same tokens in the same order."""
    whole, split = _tokens(line), _tokens("\n".join(p.strip() for p in pieces))
    if whole is None or split is None:
        return len(pieces) == 1
    return [t.string for t in whole if t.type != tokenize.COMMENT] == \
        [t.string for t in split if t.type != tokenize.COMMENT]
