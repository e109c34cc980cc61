"""The probe report as rich text: summary, findings, and a per-layer gradient-norm bar chart."""

from __future__ import annotations

import math
import re

from rich.cells import cell_len
from rich.console import Group
from rich.text import Text

from gradflow.models import LAYER

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def fold_runs(rows: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Runs of consecutive numbered keys with equal values become one row: 'layers.0–31 ×32'.

    `rows` is (key, value) in order; a key folds with the one before it when both are PREFIX.N with the same
    prefix, consecutive numbers, and equal values.
    """
    out: list[list] = []  # [prefix, first, last, value, key]
    for key, value in rows:
        hit = _NUMBERED.match(key)
        prev = out[-1] if out else None
        if (hit and prev is not None and prev[0] == hit.group(1) and prev[2] + 1 == int(hit.group(2))
                and prev[3] == value):
            prev[2] = int(hit.group(2))
            continue
        out.append([hit.group(1), int(hit.group(2)), int(hit.group(2)), value, key] if hit
                   else [None, 0, 0, value, key])
    return [(f"{prefix}.{a}–{b} ×{b - a + 1}" if prefix is not None and b > a else key, value)
            for prefix, a, b, value, key in out]


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


class Lines:
    """Text lines that wrap to the console's width with a hanging indent, and between chunks rather than inside one.

    Each line is a list of chunks (Text) joined by `sep`; a line that does not fit continues on the next line,
    indented by `indent`, at a chunk boundary (a chunk wider than the console is wrapped inside, at spaces).
    No line ends in spaces, so the output greps and diffs cleanly.
    """

    def __init__(self, *, indent: int = 8, sep: str = "  "):
        self.items: list[tuple[list[Text], int | None]] = []
        self.indent, self.sep = indent, sep

    def add(self, *chunks: Text | str, indent: int | None = -1, wrap: bool = True) -> "Lines":
        """One line of chunks; `indent` for its continuation lines (default: the Lines'); wrap=False keeps it whole
        (code, which must paste as it is)."""
        chunks = [c if isinstance(c, Text) else Text(c) for c in chunks]
        self.items.append((chunks, None if not wrap else (self.indent if indent == -1 else indent)))
        return self

    def lines(self, console, width: int | None) -> list[Text]:
        out: list[Text] = []
        for chunks, indent in self.items:
            if indent is None:
                out.append(_rstrip(Text(self.sep).join(chunks)))
                continue
            line = Text()
            for chunk in chunks:
                if not line.plain:
                    line = chunk.copy()
                elif width is None or line.cell_len + len(self.sep) + chunk.cell_len <= width:
                    line.append(self.sep)
                    line.append_text(chunk)
                else:
                    out.extend(_wrap(line, width, indent))
                    line = Text(" " * indent) + chunk
            out.extend(_wrap(line, width, indent))
        return out

    def __rich_console__(self, console, options):
        yield _joined(self.lines(console, options.max_width))


def _wrap(line: Text, width: int | None, indent: int) -> list[Text]:
    """`line` wrapped at spaces and commas to `width`, continuation lines indented by `indent`. Never inside a
    word: a module path longer than the width stays whole on a line of its own."""
    if width is None or line.cell_len <= width:
        return [_rstrip(line)]
    lead = len(line.plain) - len(line.plain.lstrip(" "))
    body = line[lead:]
    pad = max(lead, indent)
    out = []
    for i, piece in enumerate(body.divide(_breaks(body.plain, max(width - pad, 20)))):
        out.append(_rstrip(Text(" " * (lead if i == 0 else pad)) + piece))
    return out


_WORD = re.compile(r"[^\s,]*(?:,\s*|\s+|$)")  # a word with the comma or spaces after it: a line may end there


def _breaks(plain: str, room: int) -> list[int]:
    """Offsets where the lines of `plain` start, greedily filling `room` cells (trailing spaces not counted)."""
    offsets, start, end = [], 0, 0
    for word in _WORD.finditer(plain):
        if not word.group():
            continue
        if end > start and cell_len(plain[start:word.end()].rstrip()) > room:
            offsets.append(word.start())
            start = word.start()
        end = word.end()
    return offsets


def _rstrip(t: Text) -> Text:
    t = t.copy()
    t.rstrip()
    return t


def _joined(lines: list[Text]) -> Text:
    t = Text("\n").join(lines)
    t.no_wrap, t.overflow = True, "ignore"  # already fitted: the console must not wrap it again
    return t


def summary(report) -> Lines:
    m, p, loss = report.model, report.params, report.loss
    out = Lines(indent=2)
    head = [Text(f"{m['class']}", style="bold"),
            Text(f"{m['params_trainable']:,} trainable / {m['params_total']:,} params")]
    if m["quantized"] != "none":
        head.append(Text(f"{m['quantized']}"))
    head.append(Text(f"checkpointing: {m['gradient_checkpointing']}"))
    head.append(Text(f"input-grad hook: {'yes' if m['input_grad_hook'] else 'no'}"))
    out.add(*head, indent=2)
    world = distributed_line(report.distributed)
    if world is not None:
        out.add(*world, indent=2)
    if loss is not None:
        if loss.get("error"):
            out.add(Text(f"{loss.get('error_phase')} raised: {loss['error']}", style="red"), indent=2)
        value = "n/a" if loss["value"] is None else f"{loss['value']:.4f}"
        grad_fn = Text("grad_fn: ")
        grad_fn.append(f"{loss['grad_fn']}" if loss["grad_fn"] else "none",
                       style="green" if loss["grad_fn"] else "bold red")
        out.add(Text(f"loss {value}"), grad_fn, indent=2)
    if p.get("with_grad") is not None:
        ok = p["with_grad"] - p["zero_grad"] - p["nonfinite_grad"]
        t = Text(f"trainable tensors {p['trainable']}: ")
        t.append(f"{ok} ok", style="green")
        t.append(f", {p['none_grad']} none", style="bold red" if p["none_grad"] else "")
        t.append(f", {p['zero_grad']} zero", style="yellow" if p["zero_grad"] else "")
        t.append(f", {p['nonfinite_grad']} non-finite", style="bold red" if p["nonfinite_grad"] else "")
        out.add(t, indent=2)
    out.add(Text(""))  # a blank line before what follows
    return out


_WRAPPERS = {"ddp": "DDP", "fsdp": "FSDP2", "fsdp1": "FSDP1"}


def distributed_line(info: dict | None) -> list[Text] | None:
    """Under torchrun: how the report was gathered (wrapper, world size, backend, batch, disagreements), as chunks."""
    if not info:
        return None
    wrapper = info.get("wrapper")
    how = f"{_WRAPPERS.get(wrapper, wrapper)} on " if wrapper else ""  # no wrapper: the user code's own group
    chunks = [Text(f"distributed: {how}{info['world_size']} ranks ({info['backend']})", style="bold")]
    batch = info.get("batch") or info.get("preflight_batch")
    if batch:
        chunks.append(Text(f"batch: {batch}"))
    differ = info.get("ranks_disagree_count") or 0
    partial = len(info.get("findings_on_some_ranks") or [])
    if differ:
        chunks.append(Text(f"{differ} parameter(s) differ between ranks", style="yellow"))
    if partial:
        chunks.append(Text(f"{partial} finding(s) on some ranks only", style="yellow"))
    return chunks


def findings_table(findings, empty: str = "no findings: gradients reach every trainable parameter"):
    """Findings as short blocks: they read well at any terminal width and in CI logs."""
    if not findings:
        return Text(empty, style="green")
    out = Lines()
    for f in findings:
        head = Text(f"{f.severity:<7}", style=_STYLE[f.severity])
        head.append(f" {f.code} ", style="bold")
        head.append(f.slug, style="bold")
        if f.location:  # on the same line when it fits, else on the next one
            out.add(head, Text(f"at {f.location}", style="magenta"))
        else:
            out.add(head)
        out.add(Text(f"        {f.message}"))
        if f.fix:
            out.add(Text(f"        fix ({f.fix.applicability}): {f.fix.title}", style="dim"))
            if f.fix.here:
                out.add(Text(f"        here: {f.fix.here}", style="dim"))
    out.add(Text(""))
    return out


def layer_groups(per_param) -> list[tuple[str, float | None, dict]]:
    """Per-layer (or per top-level module) gradient norm and grad-class counts, in model order."""
    groups: dict[str, dict] = {}
    for row in per_param:
        hit = LAYER.match(row["name"])
        key = f"{hit.group('prefix').rsplit('.', 1)[-1]}.{hit.group('index')}" if hit else _top(row["name"])
        g = groups.setdefault(key, {"sq": 0.0, "counts": {}, "any": False})
        g["counts"][row["grad"]] = g["counts"].get(row["grad"], 0) + 1
        if row["grad_norm"] is not None and math.isfinite(row["grad_norm"]):
            g["sq"] += row["grad_norm"] ** 2
            g["any"] = True
    return [(k, math.sqrt(g["sq"]) if g["any"] else None, g["counts"]) for k, g in groups.items()]


def _top(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "default", "weight", "bias")]
    return parts[0] if parts else name


_DECADES = 6  # the bar spans six decades below the largest norm


class GradChart:
    """Per-layer gradient norms as bars on a log scale, runs of identical no-gradient layers folded into one row."""

    def __init__(self, rows: list[tuple[str, float | None, dict]], width: int = 40):
        self.width = width
        self.top = max((n for _, n, _ in rows if n), default=0.0)
        shown = []
        for key, norm, counts in rows:
            if norm is None or norm == 0:
                label = "no grad" if counts.get("none") else "zero"
                shown.append((key, ("empty", label, "bold red" if counts.get("none") else "yellow")))
            else:
                shown.append((key, ("bar", norm, counts.get("none", 0))))
        self.rows = fold_runs(shown)

    def lines(self, console, width: int | None) -> list[Text]:
        title = Text()
        title.append("gradient norm per layer", style="bold")
        if self.top > 0:
            title.append(f" (log scale, {_DECADES} decades: a full bar is {self.top:.1e})", style="dim")
        else:
            title.append(" (log scale)", style="dim")
        key_w = max(cell_len(k) for k, _ in self.rows)
        notes = {k: self._note(v) for k, v in self.rows}
        note_w = max((n.cell_len for n in notes.values()), default=0)
        bar_w = self.width if width is None else max(10, min(self.width, width - key_w - note_w - 4))
        out = _wrap(title, width, 2)
        for key, value in self.rows:
            line = Text(" " * (key_w - cell_len(key)) + key + "  ")
            kind = value[0]
            if kind == "empty":
                line.append("∅ " + value[1], style=value[2])
            else:
                norm, missing = value[1], value[2]
                # log scale keeps small layers visible next to large ones
                frac = (math.log10(norm) - math.log10(self.top) + _DECADES) / _DECADES if self.top > 0 else 0
                n = max(1, int(round(max(frac, 0) * bar_w)))
                line.append("█" * n, style="green" if not missing else "yellow")
                line.append(" " * (bar_w - n) + "  ")
                line.append_text(notes[key])
            out.append(_rstrip(line))
        return out

    @staticmethod
    def _note(value) -> Text:
        if value[0] != "bar":
            return Text("")
        note = Text(f"{value[1]:.3e}")
        if value[2]:
            note.append(f"  ({value[2]} none)", style="red")
        return note

    def __rich_console__(self, console, options):
        yield _joined(self.lines(console, options.max_width))


def grad_chart(report, width: int = 40) -> GradChart | None:
    rows = layer_groups(report.params.get("per_param") or [])
    if not rows:
        return None
    return GradChart(rows, width)


def measured(report) -> Lines | None:
    """What --check-gc and --steps measured, one line each (the findings say what is wrong)."""
    gc, run = report.gc_check, report.steps
    if gc is None and run is None:
        return None
    out = Lines(indent=2)
    if gc is not None:
        if not gc["compared"]:
            out.add(Text(f"check-gc: not compared: {gc['reason']}", style="yellow"), indent=2)
        else:
            how = f"{gc['mode']}" + (" (turned on for the check)" if gc["enabled_for_check"] else "")
            if gc["error_with_gc"] or gc["error_without_gc"]:
                result = Text("a run raised", style="bold red")
            elif gc["diffs_count"]:
                result = Text(f"{gc['diffs_count']} of {gc['params_compared']} gradients differ", style="bold red")
            else:
                result = Text(f"{gc['params_compared']} gradients equal", style="green")
            out.add(Text(f"check-gc: {how} vs off:"), result, indent=2)
    if run is not None:
        head = Text(f"steps: {run['steps']} × {run['optimizer']} ({run['optimizer_source']})"
                    + (f", scheduler {run['scheduler']}" if run["scheduler"] else "") + ":")
        if run["error"]:
            result = Text(f"raised {run['error']}", style="bold red")
        else:
            stale = run["not_changed_count"]
            result = Text(f"{run['params_changed']} of {run['params_tracked']} intended parameters changed",
                          style="bold red" if stale else "green")
        lr = run["lrs"][0] if run["lrs"] else []
        out.add(head, result, Text(f"lr at step 1: {', '.join(f'{v:.3g}' for v in lr)}", style="dim"), indent=2)
    out.add(Text(""))
    return out


def packed_check(report) -> Text | None:
    """One line: what the packed-batch leak check measured (the finding says what is wrong)."""
    leak = getattr(getattr(report, "snapshot", None), "packed_leak", None)
    if leak is None:
        return None
    head = f"packed: {leak.samples} samples in {leak.rows} row{'s' if leak.rows != 1 else ''}, " \
           f"attention {leak.attn_implementation or 'unknown'}: "
    if leak.error:
        return Text(head + f"not measured ({leak.error})\n", style="yellow")
    if leak.leaks:
        return Text.assemble(head, (f"{len(leak.leaks)} of {leak.checked} samples reach another's inputs",
                                    "bold red"), "\n")
    return Text.assemble(head, (f"boundaries hold ({leak.checked} checked, cross-sample gradient exactly 0)"
                                if leak.max_ratio == 0 else f"boundaries hold ({leak.checked} checked)", "green"),
                         "\n")


def probe_text(report):
    parts = [summary(report)]
    extra = measured(report)
    if extra is not None:
        parts.append(extra)
    packed = packed_check(report)
    if packed is not None:
        parts.append(packed)
    parts.append(findings_table(report.findings))
    chart = grad_chart(report)
    if chart is not None:
        parts.append(chart)
    return Group(*parts)
