"""`gradflow explain [CODE|SLUG]`: a finding's documentation, or the list of all findings."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from gradflow.cli._completion import finding_names
from gradflow.cli._errors import fail


def explain(code: Annotated[Optional[str], typer.Argument(metavar="CODE|SLUG", help="A finding code (GF101) or slug.", autocompletion=finding_names)] = None,
            format: Annotated[str, typer.Option("--format", help="text | json")] = "text"):
    """Print a finding's documentation (What it does / Why is this bad? / Example / Fix safety)."""
    from gradflow.errors import GradflowError
    from gradflow.fixes import applicability
    from gradflow.rules import load
    from gradflow.rules.codes import CODES, lookup

    try:
        if format not in ("text", "json"):
            raise GradflowError(f"--format {format!r} is not text or json", "Pick one of those")
        if code is None:
            rules = [load(c) for c in CODES]
            fixes = {r.slug: applicability(r.slug) for r in rules}  # a fix's to say, not a rule's
            if format == "json":
                import json

                print(json.dumps([{"code": r.code, "slug": r.slug, "severity": r.severity,
                                   "fix": fixes[r.slug]} for r in rules], indent=2))
                return
            for r in rules:
                print(f"{r.code}  {r.slug:<36} {r.severity:<8} fix: {fixes[r.slug] or '-'}")
            return
        found = lookup(code)
        if found is None:
            raise GradflowError(f"unknown finding {code!r}", "Run 'gradflow explain' to list every code and slug")
        rule = load(found)
        if format == "json":
            import json

            print(json.dumps({"code": rule.code, "slug": rule.slug, "severity": rule.severity,
                              "fix": applicability(rule.slug), "doc": rule.doc.strip()}, indent=2))
            return
        _print_doc(f"{rule.code} {rule.slug} ({rule.severity})", rule.doc.strip())
    except GradflowError as exc:
        fail(exc)


def _print_doc(head: str, doc: str) -> None:
    """Rendered markdown on a terminal; the markdown itself when piped (for docs, grep, and tools that render it)."""
    from rich.console import Console

    console = Console(highlight=False)  # FORCE_COLOR / TTY_COMPATIBLE count as a terminal, as rich defines it
    if not console.is_terminal:
        print(f"{head}\n")
        print(doc)
        return
    from rich.text import Text

    from gradflow.report.render.markdown import render_markdown

    console.print(Text(head, style="bold"))
    console.print()
    console.print(render_markdown(doc), crop=False)  # code blocks run past the edge rather than lose their end
