"""The patch report as rich text: findings before, fixes and why, the before/after table, the proof, the snippet."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gradflow.render.text import findings_table, summary

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


def before_after_table(report) -> Table:
    after = report.after
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("")
    table.add_column("before")
    table.add_column("after" if after is not None else "after (dry run: not patched)")
    table.add_row("findings", _findings_cell(report.before), _findings_cell(after))
    table.add_row("params with gradients", _grads_cell(report.before), _grads_cell(after))
    table.add_row("loss grad_fn", _grad_fn_cell(report.before), _grad_fn_cell(after))
    return table


def _plan_lines(entries, t: Text, *, changed_key: str, mark: str, style: str) -> None:
    for f in entries:
        t.append(f"  {mark} ", style=style)
        t.append(f"{f['id']}", style="bold")
        t.append(f" ({f['applicability']})  answers {', '.join(f['answers'])}")
        if f.get("location"):
            t.append(f"  at {f['location']}", style="magenta")
        t.append("\n")
        for line in f.get(changed_key) or f.get("changes") or []:
            t.append(f"      {line}\n")
        if f.get("why"):
            t.append(f"      why: {f['why']}\n", style="dim")


def patch_text(report):
    extra = report.extra
    parts = [summary(report.before)]
    head = Text("findings before patch\n", style="bold")
    parts.append(head + findings_table(report.before.findings))

    t = Text()
    if extra.get("dry_run"):
        plan = extra.get("plan") or []
        t.append(f"plan ({len(plan)} fix{'es' if len(plan) != 1 else ''}; dry run: nothing was changed)\n", style="bold")
        _plan_lines(plan, t, changed_key="changes", mark="•", style="cyan")
        if plan:
            t.append("  a real patch re-probes after these and fixes what they reveal (e.g. a cut checkpoint behind "
                     "frozen adapters)\n", style="dim")
    else:
        applied = report.fixes_applied
        t.append(f"fixes applied ({len(applied)})\n", style="bold")
        if not applied:
            t.append("  none: nothing to change\n" if not extra.get("rolled_back") else "", style="dim")
        _plan_lines(applied, t, changed_key="changed", mark="✓", style="green")
        rb = extra.get("rolled_back")
        if rb:
            t.append(f"  rolled back {len(rb['fixes'])} fixes: {rb['reason']}\n", style="bold red")
    parts.append(t)
    parts.append(before_after_table(report))
    parts.append(Text(""))

    if report.after is not None:
        head = Text("findings after patch\n", style="bold")
        parts.append(head + findings_table(report.after.findings))
        parts.append(proof_text(extra.get("verification")))

    skipped = extra.get("skipped_unsafe") or []
    if skipped:
        t = Text("unsafe fixes not applied (run with --unsafe-fixes)\n", style="bold yellow")
        _plan_lines(skipped, t, changed_key="changes", mark="•", style="yellow")
        parts.append(t)
    advice = extra.get("advice") or []
    if advice:
        t = Text("to fix in your code (display-only)\n", style="bold")
        _plan_lines(advice, t, changed_key="changes", mark="→", style="magenta")
        parts.append(t)
    saved = extra.get("saved")
    if saved:
        parts.append(Text(f"saved to {saved['dir']}: {', '.join(saved['files'])}\n"
                          f"recipe: {saved['recipe']} (train --recipe takes it)", style="bold"))
    return Group(*parts)


def proof_text(verification) -> Text:
    if not verification:
        return Text("")
    if verification["ok"]:
        return Text(f"proof: every intended trainable parameter ({verification['intended']}) receives a finite "
                    f"gradient; the loss has grad_fn {verification['loss_grad_fn']}\n", style="bold green")
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
    return Text(f"not proven: {verification['receiving']} of {verification['intended']} intended trainable parameters "
                f"receive a finite gradient; {'; '.join(why)}\n", style="bold red")


def snippet_text(snippet: str) -> Text:
    """The snippet between two marker lines, unwrapped, so it can be copied (and extracted by tools) as is."""
    rule = SNIPPET_START + "─" * 40
    return Text(f"{rule}\n{snippet.rstrip()}\n{SNIPPET_END * 33}")
