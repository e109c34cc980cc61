"""Shared command plumbing: build the setup and batch, print a report, choose the exit code."""

from __future__ import annotations

import contextlib
import os
import sys

from gradflow.errors import ExitCode, GradflowError


@contextlib.contextmanager
def user_code(setup=None):
    """What the user's code prints (a factory, a forward, a Trainer) goes to stderr: stdout carries only data.

    With the factory's `setup`, a SystemExit or KeyboardInterrupt its forward or loss raises is an error naming
    the factory (exit 2), never a silent exit 0 that passes a CI gate.
    """
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        except (SystemExit, KeyboardInterrupt) as exc:
            from gradflow.setup.sources import Kind, user_exit_error

            if setup is None or setup.kind not in (Kind.FACTORY, Kind.TRAINER):
                raise

            raise user_exit_error(exc, setup.source, "running its forward, loss or backward") from exc


def prepare(model, opts, *, data, batch_size, seq_len, seed, out, adopt=None):
    """Resolve, build and batch, with progress on stderr. `adopt(setup)` may adjust the setup before the batch
    is made (e.g. set a factory's DDP wrapper aside: gradflow.distributed.adopt)."""
    from gradflow.cli._options import check_positive
    from gradflow.setup.load import load_setup, make_batch

    check_positive(batch_size, "--batch-size")
    check_positive(seq_len, "--seq-len", 32)
    if data is not None:
        check_data(data)
    with out.status(f"loading {model}"), user_code():
        setup = load_setup(model, opts)
        if adopt is not None:
            adopt(setup)
        batch = make_batch(setup, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return setup, batch


def check_data(path: str) -> None:
    """A bad --data file fails before the model loads, not after."""
    from gradflow.data.jsonl import read_jsonl

    _, problems = read_jsonl(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GradflowError(f"malformed sample at {problems[0]}{more}", "Fix or remove that line")


def exit_for(report, fail_on) -> int:
    return int(ExitCode.FINDINGS if report.fails(str(fail_on or "error")) else ExitCode.OK)


def check_format(fmt: str, allowed) -> None:
    if fmt not in allowed:
        raise GradflowError(f"--format {fmt!r} is not one of {', '.join(allowed)}", "Pick one of those")


def check_fail_on(fail_on) -> None:
    from gradflow.choices import FailOn

    if fail_on is not None:
        FailOn.parse(fail_on)


class Gate:
    """The CI side of a command: [tool.gradflow] with the flags over it, rule selection, --baseline, exit code.

    Built before the model loads, so a bad flag or config key fails fast; `judge` runs on the finished report.
    """

    def __init__(self, *, fail_on=None, select=None, ignore=None, trainable=None, baseline=None,
                 update_baseline: bool = False, isolated: bool = False):
        from gradflow.report.config import resolve

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

    def judge(self, report, *, command: str, model: str):
        """(the report as selected, the exit code); writes or compares the baseline."""
        import dataclasses

        from gradflow.report.selection import apply_selection

        shown = apply_selection(report, self.settings.selection)
        self.hidden = len(report.findings) - len(shown.findings)
        code = exit_for(shown, self.settings.fail_on)
        if self.baseline is not None:
            from gradflow.report.baseline import check

            self.result = check(shown, self.baseline, update=self.update_baseline, command=command, model=model)
            shown = dataclasses.replace(shown, baseline=self.result.to_dict())
            if self.result.status != "written":  # a baseline accepts the findings it records
                code = int(ExitCode.FINDINGS if self.result.changed else ExitCode.OK)
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
        path = self.result.path
        if self.result.status == "written":
            hint(f"gradflow: wrote the baseline {path}")
        elif self.result.changed:
            out.tell(f"gradflow: the baseline {path} no longer matches (+ added, - removed); "
                     "pass --update-baseline to accept the new state:")
            for line in self.result.lines():
                out.tell(f"  {line}")
        else:
            hint(f"gradflow: matches the baseline {path}")
