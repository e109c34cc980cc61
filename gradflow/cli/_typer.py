"""gradflow's Click classes for Typer (`cls=`): two adjustments to how Typer 0.29 parses and shows options."""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup

from gradflow.cli._completion import with_shell_value


def _bare_flags(params: list) -> list:
    """No `<bool>` beside an on/off flag in --help: Typer 0.29 shows a type for every option without a metavar."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A gradflow command: flags shown bare."""

    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


class Group(TyperGroup):
    """The `gradflow` root: flags shown bare; --show-completion / --install-completion take an optional SHELL."""

    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, with_shell_value(args))
