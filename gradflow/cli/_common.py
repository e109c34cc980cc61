"""Shared command plumbing: build the setup and batch, print a report, choose the exit code."""

from __future__ import annotations

import contextlib
import os

from gradflow.errors import ExitCode, GradflowError
from gradflow.stdio import stdout_to_stderr


@contextlib.contextmanager
def user_code(spec: str):
    """What the user's code prints (a factory, a forward, a Trainer) goes to stderr: stdout carries only data, even
    what it writes below Python (os.write(1, …), os.system, an extension): gradflow.stdio moves file descriptor 1.

    When MODEL names code (a factory or a Trainer script), a SystemExit or KeyboardInterrupt it raises is an error
    naming the factory (exit 2), never a silent exit 0 that passes a CI gate.
    """
    from gradflow.setup.sources import os_exit_refused

    with stdout_to_stderr(), os_exit_refused():
        try:
            yield
        except (SystemExit, KeyboardInterrupt) as exc:
            from gradflow.setup.sources import names_code, user_exit_error

            if not names_code(spec):
                raise
            raise user_exit_error(exc, spec, "running its forward, loss or backward") from exc


def exit_for(report, fail_on) -> int:
    return int(ExitCode.FINDINGS if report.fails(str(fail_on or "error")) else ExitCode.OK)


def finish(out, report, gate: "Gate", code: int):
    """The end of inspect and probe-backward after the report: its notes on stderr, plain and unwrapped (paths and
    line numbers intact), the gate's word on the exit code; under torchrun every rank waits for rank 0's output,
    then the process group goes. Exits with `code`."""
    import typer

    from gradflow.world import end

    for note in [] if out.quiet else report.notes:
        out.tell(f"gradflow: note: {note}")
    gate.explain(out)
    end()
    raise typer.Exit(code)


def check_format(fmt: str, allowed) -> None:
    if fmt not in allowed:
        raise GradflowError(f"--format {fmt!r} is not one of {', '.join(allowed)}", "Pick one of those")


class Gate:
    """The CI side of a command: [tool.gradflow] with the flags over it, rule selection, --baseline, exit code.

    Built before the model loads, so a bad flag or config key fails fast; `judge` runs on the finished report.
    """

    def __init__(self, ci, trainable: str | None = None):
        """`ci`: the command's CIArgs; `trainable`: its --trainable ([tool.gradflow] may name one too)."""
        from gradflow.report.config import resolve

        fail_on, select, ignore, baseline = ci.fail_on, ci.select, ci.ignore, ci.baseline
        update_baseline, isolated = ci.update_baseline, ci.isolated

        if update_baseline and baseline is None:
            raise GradflowError("--update-baseline has no file to write", "Pass --baseline FILE with it")
        self.settings = resolve(fail_on=fail_on, select=select, ignore=ignore, trainable=trainable,
                                isolated=isolated)
        self.baseline, self.update_baseline = baseline, update_baseline
        if baseline is not None and not update_baseline and os.path.exists(baseline):
            from gradflow.report.baseline import load

            load(baseline)  # a broken file fails now, not after the model has loaded
        self.trainable = self.settings.trainable
        self.hidden = 0
        self.result = None
        self.run_for = ""  # "COMMAND MODEL" of this run, for the baseline's note

    def judge(self, report, *, command: str, model: str):
        """(the report as selected, the exit code); writes or compares the baseline."""
        import dataclasses

        from gradflow.report.selection import apply_selection

        shown = apply_selection(report, self.settings.selection)
        self.hidden = len(report.findings) - len(shown.findings)
        self.run_for = f"{command} {model}"
        code = exit_for(shown, self.settings.fail_on)
        if self.baseline is not None:
            from gradflow.report.baseline import check

            self.result = check(shown, self.baseline, update=self.update_baseline, command=command, model=model,
                                fail_on=str(self.settings.fail_on or "error"), selection=self.settings.selection)
            shown = dataclasses.replace(shown, baseline=self.result.to_dict())
            if self.result.status != "written":  # only what the baseline does not hold fails (new, at --fail-on)
                code = int(ExitCode.FINDINGS if self.result.fails else ExitCode.OK)
        return shown, code

    def explain(self, out) -> None:
        """After the data: what selection hid (a hint), and what the baseline did (its changes even with -q)."""
        def hint(text: str) -> None:  # plain and unwrapped, like the error line: paths and [tool.gradflow] intact
            if not out.quiet:
                out.tell(text)

        if self.hidden:
            sources = " and ".join(layer.source for layer in self.settings.selection.layers)
            hint(f"gradflow: {self.hidden} finding(s) not shown, deselected by {sources}")
        if self.result is None:
            return
        result, path = self.result, self.result.path
        if result.recorded_for:  # its findings and trainable set are another setup's: say so before the changes
            (out.tell if result.fails else hint)(
                f"gradflow: note: the baseline {path} was recorded for {result.recorded_for}, not this run's "
                f"{self.run_for}; pass --update-baseline to record this setup, or keep one baseline per MODEL")
        if result.status == "written":
            hint(f"gradflow: wrote the baseline {path}")
        elif result.fails:  # why the exit code is 1: printed even with --quiet
            reasons = [f"{len(result.failing)} new finding(s) at or above --fail-on {result.fail_on}"] \
                if result.failing else []
            reasons += ["a changed trainable set"] if result.trainable_changed else []
            out.tell(f"gradflow: not in the baseline {path}: {' and '.join(reasons)} (+ new, - fixed); fix them, "
                     "or pass --update-baseline to accept this run:")
            for line in result.lines():
                out.tell(f"  {line}")
        elif result.changed:
            fixed, new = len(result.findings_removed), len(result.findings_added)
            parts = ([f"{fixed} fixed"] if fixed else []) + ([f"{new} new"] if new else [])
            parts += ["the trainable set changed"] if result.trainable_changed else []
            hint(f"gradflow: the baseline {path} is out of date ({', '.join(parts)}); nothing fails; "
                 "pass --update-baseline to record this run:")
            for line in result.lines():
                hint(f"  {line}")
        else:
            hint(f"gradflow: matches the baseline {path}")
