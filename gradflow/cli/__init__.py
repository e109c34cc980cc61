"""The `gradflow` command line: thin commands over the library. No torch import at module level."""

from __future__ import annotations

import sys

import typer

from gradflow import __version__
from gradflow.cli._completion import InstallCompletion, ShowCompletion
from gradflow.cli._typer import Command, Group

# completion (commands, options, choice values, explain's codes): --install-completion and --show-completion
# [SHELL] are ours (gradflow.cli._completion), not Typer's, so that the shell named wins over the detected one
app = typer.Typer(
    name="gradflow", cls=Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Find, explain and fix broken gradient flow in PyTorch / transformers / PEFT fine-tuning.\n\n"
         "Exit codes: 0 no finding at or above --fail-on, 1 findings, 2 usage/input/tool error.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        print(f"gradflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          install_completion: str = InstallCompletion, show_completion: str = ShowCompletion):
    """gradflow"""


def _register():
    from gradflow.cli import explain, inspect_cmd, probe_cmd

    app.command("inspect", cls=Command)(inspect_cmd.inspect)
    app.command("probe-backward", cls=Command)(probe_cmd.probe_backward)
    app.command("explain", cls=Command)(explain.explain)
    for module, names in (("gradflow.cli.patch_cmd", ("patch",)), ("gradflow.cli.train_cmd", ("train", "merge"))):
        try:
            mod = __import__(module, fromlist=["_"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            if hasattr(mod, name):
                app.command(name, cls=Command)(getattr(mod, name))


_register()


def _quiet_libraries() -> None:
    """Library chatter (logging, and the warnings in KNOWN_NOISE) stays off stderr; other warnings still show."""
    import logging
    import os

    from gradflow.noise import ignore_known_noise

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gradflow.cli._errors import debug

    if not debug():
        # huggingface_hub sets its own level on import, so the variable, not setLevel, silences its retry chatter
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        ignore_known_noise()
        for name in ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "torch.utils.checkpoint"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _is_usage_error(exc: BaseException) -> bool:
    """Click's (or Typer's vendored Click's) exceptions for bad command lines: unknown option, missing argument."""
    return hasattr(exc, "format_message") and type(exc).__module__.split(".")[0] in ("click", "typer")


def main() -> None:
    """Console-script entry point: every error is one line on stderr and exit 2; a traceback only with GRADFLOW_DEBUG=1."""
    from gradflow.cli._errors import fail, usage_error

    _quiet_libraries()
    try:
        # standalone_mode=False: Click's usage errors come back here instead of Typer's multi-line boxes
        code = app(standalone_mode=False, prog_name="gradflow")
    except SystemExit as exc:
        from gradflow.cli._errors import foreign_exit_error, raised_outside_gradflow

        if raised_outside_gradflow(exc):  # user code exiting, even with 0, is not a clean run
            fail(foreign_exit_error(exc))
        raise
    except KeyboardInterrupt as exc:
        fail(exc)
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `gradflow`: the help, and exit 2 as Click does
            text = exc.ctx.get_help()  # Typer's rich help prints itself and returns ""; plain Click returns it
            if text.strip():
                sys.stderr.write(text + "\n")
            raise SystemExit(2) from None
        if type(exc).__name__ == "Abort":  # Click's wrapper for Ctrl-C / EOF
            fail(KeyboardInterrupt())
        if _is_usage_error(exc):
            usage_error(exc)
        fail(exc)  # GradflowError, or the last resort: never a traceback unless GRADFLOW_DEBUG=1
    raise SystemExit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The `gradflow` console script and `python -m gradflow`: main(), then stdout sealed (gradflow.stdio) for what
    the process runs on its way out, such as a factory's atexit handler writing to fd 1."""
    from gradflow.stdio import seal_stdout

    try:
        main()
    finally:
        seal_stdout()


if __name__ == "__main__":
    entry()
