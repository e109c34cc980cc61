"""Shell completion: --show-completion / --install-completion [SHELL], and the values `explain` completes.

Typer's own pair of options is a plain flag when shellingham is installed: `--show-completion zsh` ran the eager
flag with the detected shell and left `zsh` behind as a stray word. Here the shell is an optional value: the one
named wins, and detection is only the default. Typer 0.29 has no optional option values (it drops Click's
`flag_value`), so the root group gives a bare flag its default value before parsing (`with_shell_value`).
"""

from __future__ import annotations

import typer
from typer._completion_classes import completion_init
from typer._completion_shared import Shells, _get_shell_name, get_completion_script, install

from gradflow.errors import GradflowError
from gradflow.rules.codes import CODES

SHELLS = tuple(s.value for s in Shells)
DETECT = "detect"  # the value of a bare --show-completion / --install-completion

# Typer registers its completion classes (the scripts' protocol) only with add_completion=True
completion_init()


def _shell(option: str, value: str) -> str:
    """The shell named, or the one this process runs under; a bad name is one line, exit 2."""
    if value == DETECT:
        shell = _get_shell_name()
        if shell not in SHELLS:
            raise GradflowError(f"{option}: the current shell ({shell or 'not detected'}) is not one of "
                                f"{', '.join(SHELLS)}", f"Name the shell: {option} zsh")
        return shell
    if value.lower() not in SHELLS:
        raise GradflowError(f"{option} {value!r} is not one of {', '.join(SHELLS)}", "Pick one of those")
    return value.lower()


def _show(ctx, param, value):
    if value is None or ctx.resilient_parsing:
        return value
    prog_name = ctx.find_root().info_name or "gradflow"
    shell = _shell(param.opts[0], value)
    script = get_completion_script(prog_name=prog_name, complete_var=_complete_var(prog_name), shell=shell)
    typer.echo(script)
    raise typer.Exit(0)


def _install(ctx, param, value):
    if value is None or ctx.resilient_parsing:
        return value
    prog_name = ctx.find_root().info_name or "gradflow"
    shell, path = install(shell=_shell(param.opts[0], value), prog_name=prog_name,
                          complete_var=_complete_var(prog_name))
    typer.echo(f"{shell} completion installed in {path}", err=True)
    typer.echo("Completion will take effect once you restart the terminal", err=True)
    raise typer.Exit(0)


def _complete_var(prog_name: str) -> str:
    return "_{}_COMPLETE".format(prog_name.replace("-", "_").upper())


def _option(name: str, callback, what: str):
    return typer.Option(None, name, callback=callback, is_eager=True, expose_value=False, metavar="[SHELL]",
                        show_default=False,
                        help=f"{what} for SHELL ({', '.join(SHELLS)}); without one, for the current shell.")


ShowCompletion = _option("--show-completion", _show, "Print the completion script")
InstallCompletion = _option("--install-completion", _install, "Install completion")
OPTIONS = ("--show-completion", "--install-completion")


def with_shell_value(args: list[str]) -> list[str]:
    """The root's arguments with DETECT after a completion option that names no shell (at the end, or before
    another option): an optional value, read as Click read one before Typer 0.29. Stops at the command's name."""
    out = list(args)
    i = 0
    while i < len(out) and out[i].startswith("-"):
        if out[i] in OPTIONS:
            if i + 1 == len(out) or out[i + 1].startswith("-"):
                out.insert(i + 1, DETECT)
            i += 1  # the shell named (or DETECT) is the option's value, not the command
        i += 1
    return out


def finding_names(incomplete: str) -> list[tuple[str, str]]:
    """`explain`'s argument: the codes (GF1…) and slugs that start with what was typed, each with its other name."""
    typed = incomplete.strip()
    codes = [(code, slug) for code, (slug, _) in CODES.items() if code.startswith(typed.upper())]
    slugs = [(slug, code) for code, (slug, _) in CODES.items() if slug.startswith(typed.lower())]
    return codes + slugs
