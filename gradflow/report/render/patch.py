"""The patch report as rich text: findings before, fixes and why, the before/after table, the proof, the snippet."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from gradflow.report.render.text import Lines, findings_table, summary

SNIPPET_START = "── paste into your script "
SNIPPET_END = "──"


def _findings_cell(report) -> Text:
    if report is None:
        return Text("-")
    counts = {}
    for f in report.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    if not counts:
        return Text("none", style="green")
    parts = [f"{counts[s]} {s}{'s' if counts[s] != 1 and s != 'info' else ''}" for s in ("error", "warning", "info")
             if s in counts]
    style = "bold red" if "error" in counts else ("yellow" if "warning" in counts else "")
    return Text(", ".join(parts), style=style)


def _grads_cell(report) -> Text:
    if report is None:
        return Text("-")
    p = report.params
    if p.get("with_grad") is None:
        return Text("n/a")
    ok = p["with_grad"] - p["nonfinite_grad"]
    style = "green" if ok == p["trainable"] and p["trainable"] else "bold red"
    return Text(f"{ok} / {p['trainable']}", style=style)


def _grad_fn_cell(report) -> Text:
    if report is None:
        return Text("-")
    loss = report.loss or {}
    if loss.get("error"):
        return Text(f"error ({loss.get('error_phase')})", style="bold red")
    fn = loss.get("grad_fn")
    return Text(fn, style="green") if fn else Text("none", style="bold red")


def before_after_table(report) -> Lines:
    """Three rows, before and after, in aligned columns (a rich Table would pad the last one with spaces)."""
    after = report.after
    head = ("", "before", "after" if after is not None else "after (dry run: not patched)")
    rows = [tuple(Text(c, style="bold") for c in head),
            (Text("findings"), _findings_cell(report.before), _findings_cell(after)),
            (Text("params with gradients"), _grads_cell(report.before), _grads_cell(after)),
            (Text("loss grad_fn"), _grad_fn_cell(report.before), _grad_fn_cell(after))]
    widths = [max(row[i].cell_len for row in rows) for i in range(3)]
    out = Lines(sep="   ")
    for i, row in enumerate(rows):
        out.add(*(c + Text(" " * (w - c.cell_len)) for c, w in zip(row, widths)), wrap=False)
        if i == 0:
            out.add(Text("─" * (sum(widths) + 6)), wrap=False)
    return out


def _plan_lines(entries, out: Lines, *, changed_key: str, mark: str, style: str) -> None:
    for f in entries:
        head = Text(f"  {mark} ", style=style)
        head.append(f"{f['id']}", style="bold")
        head.append(f" ({f['applicability']})")
        chunks = [head, Text(f"answers {', '.join(f['answers'])}")]
        if f.get("location"):
            chunks.append(Text(f"at {f['location']}", style="magenta"))
        out.add(*chunks, indent=6)
        for line in f.get(changed_key) or f.get("changes") or []:
            out.add(Text(f"      {line}"), indent=8)  # what changed, wrapped at spaces (the code is the snippet)
        if f.get("why"):
            out.add(Text(f"      why: {f['why']}", style="dim"), indent=11)


def patch_text(report):
    outcome = report.patch
    parts = [summary(report.before), Text("findings before patch", style="bold"),
             findings_table(report.before.findings)]

    t = Lines()
    if outcome.dry_run:
        plan = outcome.plan or []
        t.add(Text(f"plan ({len(plan)} fix{'es' if len(plan) != 1 else ''}; dry run: nothing was changed)",
                   style="bold"))
        _plan_lines(plan, t, changed_key="changes", mark="•", style="cyan")
        if plan:
            t.add(Text("  a real patch re-probes after these and fixes what they reveal (e.g. a cut checkpoint behind "
                       "frozen adapters)", style="dim"), indent=2)
    else:
        applied = report.fixes_applied
        t.add(Text(f"fixes applied ({len(applied)})", style="bold"))
        if not applied and not outcome.rolled_back:
            t.add(Text("  none: nothing to change", style="dim"))
        _plan_lines(applied, t, changed_key="changed", mark="✓", style="green")
        rb = outcome.rolled_back
        if rb:
            t.add(Text(f"  rolled back {len(rb['fixes'])} fixes: {rb['reason']}", style="bold red"), indent=4)
    t.add(Text(""))
    parts.append(t)
    parts.append(before_after_table(report))
    parts.append(Text(""))

    if report.after is not None:
        parts.append(Text("findings after patch", style="bold"))
        parts.append(findings_table(report.after.findings))
        parts.append(proof_text(outcome.verification))

    skipped = outcome.skipped_unsafe or []
    if skipped:
        t = Lines().add(Text("unsafe fixes not applied (run with --unsafe-fixes)", style="bold yellow"))
        _plan_lines(skipped, t, changed_key="changes", mark="•", style="yellow")
        parts.append(t.add(Text("")))
    advice = outcome.advice or []
    if advice:
        t = Lines().add(Text("to fix in your code (display-only)", style="bold"))
        _plan_lines(advice, t, changed_key="changes", mark="→", style="magenta")
        parts.append(t.add(Text("")))
    saved = outcome.saved
    if saved:
        parts.append(Lines(indent=2)
                     .add(Text(f"saved to {saved['dir']}: {', '.join(saved['files'])}", style="bold"))
                     .add(Text(f"recipe: {saved['recipe']} (train --recipe takes it)", style="bold")))
    return Group(*parts)


def proof_text(verification):
    if not verification:
        return Text("")
    if verification["ok"]:
        return Lines(indent=2).add(Text(
            f"proof: every intended trainable parameter ({verification['intended']}) receives a finite gradient; "
            f"the loss has grad_fn {verification['loss_grad_fn']}", style="bold green")).add(Text(""))
    why = []
    if verification.get("loss_error"):
        why.append(f"the loss raised: {verification['loss_error']}")
    elif not verification.get("loss_grad_fn"):
        why.append("the loss has no grad_fn")
    for key, label in (("frozen", "still frozen"), ("no_grad", "without gradient"), ("nonfinite", "non-finite")):
        if verification.get(key):
            why.append(f"{len(verification[key])} {label} (first {verification[key][0]})")
    if not verification["intended"]:
        why.append("nothing is trainable")
    return Lines(indent=2).add(Text(
        f"not proven: {verification['receiving']} of {verification['intended']} intended trainable parameters "
        f"receive a finite gradient; {'; '.join(why)}", style="bold red")).add(Text(""))


def snippet_text(snippet: str) -> Text:
    """The snippet between two marker lines, unwrapped, so it can be copied (and extracted by tools) as is."""
    rule = SNIPPET_START + "─" * 40
    # no_wrap: code wrapped at the terminal's edge would not run when pasted
    return Text(f"{rule}\n{snippet.rstrip()}\n{SNIPPET_END * 33}", no_wrap=True, overflow="ignore")
