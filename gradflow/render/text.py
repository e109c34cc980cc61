"""The probe report as rich text: summary, findings, and a per-layer gradient-norm bar chart."""

from __future__ import annotations

import math
import re

from rich.console import Group
from rich.table import Table
from rich.text import Text

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer))\.(\d+)(?:\.|$)")


def summary(report) -> Text:
    m, p, loss = report.model, report.params, report.loss
    t = Text()
    t.append(f"{m['class']}", style="bold")
    t.append(f"  {m['params_trainable']:,} trainable / {m['params_total']:,} params")
    if m["quantized"] != "none":
        t.append(f"  {m['quantized']}")
    t.append(f"  checkpointing: {m['gradient_checkpointing']}")
    t.append(f"  input-grad hook: {'yes' if m['input_grad_hook'] else 'no'}\n")
    if loss is not None:
        if loss.get("error"):
            t.append(f"{loss.get('error_phase')} raised: {loss['error']}\n", style="red")
        value = "n/a" if loss["value"] is None else f"{loss['value']:.4f}"
        t.append(f"loss {value}  grad_fn: ")
        t.append(f"{loss['grad_fn']}" if loss["grad_fn"] else "none", style="green" if loss["grad_fn"] else "bold red")
        t.append("\n")
    if p.get("with_grad") is not None:
        ok = p["with_grad"] - p["zero_grad"] - p["nonfinite_grad"]
        t.append(f"trainable tensors {p['trainable']}: ")
        t.append(f"{ok} ok", style="green")
        t.append(f", {p['none_grad']} none", style="bold red" if p["none_grad"] else "")
        t.append(f", {p['zero_grad']} zero", style="yellow" if p["zero_grad"] else "")
        t.append(f", {p['nonfinite_grad']} non-finite", style="bold red" if p["nonfinite_grad"] else "")
        t.append("\n")
    return t


def findings_table(findings, empty: str = "no findings: gradients reach every trainable parameter") -> Text:
    """Findings as short blocks: they read well at any terminal width and in CI logs."""
    if not findings:
        return Text(empty, style="green")
    t = Text()
    for f in findings:
        t.append(f"{f.severity:<7}", style=_STYLE[f.severity])
        t.append(f" {f.code} ", style="bold")
        t.append(f.slug, style="bold")
        if f.location:
            t.append(f"  at {f.location}", style="magenta")
        t.append(f"\n        {f.message}\n")
        if f.fix:
            t.append(f"        fix ({f.fix.applicability}): {f.fix.title}\n", style="dim")
    return t


def layer_groups(per_param) -> list[tuple[str, float | None, dict]]:
    """Per-layer (or per top-level module) gradient norm and grad-class counts, in model order."""
    groups: dict[str, dict] = {}
    for row in per_param:
        hit = _LAYER.match(row["name"])
        key = f"{hit.group(1).rsplit('.', 1)[-1]}.{hit.group(2)}" if hit else _top(row["name"])
        g = groups.setdefault(key, {"sq": 0.0, "counts": {}, "any": False})
        g["counts"][row["grad"]] = g["counts"].get(row["grad"], 0) + 1
        if row["grad_norm"] is not None and math.isfinite(row["grad_norm"]):
            g["sq"] += row["grad_norm"] ** 2
            g["any"] = True
    return [(k, math.sqrt(g["sq"]) if g["any"] else None, g["counts"]) for k, g in groups.items()]


def _top(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "default", "weight", "bias")]
    return parts[0] if parts else name


def grad_chart(report, width: int = 40) -> Table | None:
    rows = layer_groups(report.params.get("per_param") or [])
    if not rows:
        return None
    top = max((n for _, n, _ in rows if n), default=0.0)
    table = Table(title="gradient norm per layer", show_header=False, box=None, pad_edge=False)
    table.add_column(justify="right")
    table.add_column()
    table.add_column(justify="right")
    for key, norm, counts in rows:
        if norm is None or norm == 0:
            label = "no grad" if counts.get("none") else "zero"
            table.add_row(key, Text("∅ " + label, style="bold red" if counts.get("none") else "yellow"), "")
            continue
        # log scale keeps small layers visible next to large ones
        frac = (math.log10(norm) - math.log10(top) + 6) / 6 if top > 0 else 0
        bar = "█" * max(1, int(round(max(frac, 0) * width)))
        missing = counts.get("none", 0)
        note = Text(f"{norm:.3e}") + (Text(f"  ({missing} none)", style="red") if missing else Text(""))
        table.add_row(key, Text(bar, style="green" if not missing else "yellow"), note)
    return table


def probe_text(report):
    parts = [summary(report), findings_table(report.findings)]
    chart = grad_chart(report)
    if chart is not None:
        parts.append(chart)
    return Group(*parts)
