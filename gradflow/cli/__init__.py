"""The `gradflow` command line: thin commands over the library. No torch import at module level."""

from __future__ import annotations

import sys

import typer

from gradflow import __version__

app = typer.Typer(
    name="gradflow", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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
                                       help="Print the version and exit.")):
    """gradflow"""


def _register():
    from gradflow.cli import explain, inspect_cmd, probe_cmd

    app.command("inspect")(inspect_cmd.inspect)
    app.command("probe-backward")(probe_cmd.probe_backward)
    app.command("explain")(explain.explain)
    for module, names in (("gradflow.cli.patch_cmd", ("patch",)), ("gradflow.cli.train_cmd", ("train", "merge"))):
        try:
            mod = __import__(module, fromlist=["_"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            if hasattr(mod, name):
                app.command(name)(getattr(mod, name))


_register()


def _quiet_libraries() -> None:
    """Library chatter (deprecations, the checkpoint warnings a probe provokes on purpose) stays off stderr."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("GRADFLOW_DEBUG", "") in ("", "0"):
        warnings.filterwarnings("ignore")
        for name in ("bitsandbytes", "transformers", "peft", "accelerate", "torch.utils.checkpoint"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    """Console-script entry point: Click's usage errors exit 2 already; ours are one line, exit 2."""
    from gradflow.cli._errors import fail
    from gradflow.errors import GradflowError

    _quiet_libraries()
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except GradflowError as exc:
        fail(exc)
    except KeyboardInterrupt as exc:
        fail(exc)
    except Exception as exc:  # last resort: never a traceback unless GRADFLOW_DEBUG=1
        fail(exc)


if __name__ == "__main__":
    sys.exit(main())
