"""`[tool.gradflow]` in pyproject.toml: project defaults for the command line, found and checked as ruff does.

    [tool.gradflow]
    fail-on = "warning"                 # error | warning | never
    select = ["GF1", "GF2"]             # codes, code prefixes, slugs or "ALL"
    ignore = ["trainable-embeddings-costly"]
    trainable = "lora_|so8"             # the regex --trainable takes

The file is the nearest pyproject.toml with a `[tool.gradflow]` table, searched from the current directory
upward (a pyproject.toml without the table is passed over, as ruff does). A key acts as if its flag had been
passed; a flag on the command line wins over it. A bad key or value is one error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from gradflow.choices import FailOn, plain
from gradflow.errors import GradflowError
from gradflow.report.selection import Layer, RuleSelection, parse_selectors
from gradflow.setup.sources import compile_regex

KEYS = ("fail-on", "select", "ignore", "trainable")


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    """What `[tool.gradflow]` says; `path` is None when no pyproject.toml has the table."""

    path: str | None = None
    fail_on: str | None = None
    select: tuple | None = None  # Selectors
    ignore: tuple = ()
    trainable: str | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command line and `[tool.gradflow]` together: what a command runs with."""

    fail_on: str
    selection: RuleSelection
    trainable: str | None
    config: ProjectConfig


def find_pyproject(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest pyproject.toml holding a [tool.gradflow] table, from `start` (default: cwd) upward."""
    folder = Path(start or os.getcwd()).resolve()
    for directory in (folder, *folder.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and "gradflow" in _read(candidate).get("tool", {}):
            return candidate
    return None


def _read(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            if "[tool.gradflow" not in path.read_text(errors="replace"):
                return {}
            raise GradflowError(f"{path}: reading [tool.gradflow] needs Python 3.11+ or the tomli package",
                                "pip install tomli") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise GradflowError(f"{path}: not valid TOML ({exc})", "Fix the file") from None
    except OSError as exc:
        raise GradflowError(f"{path}: cannot be read ({exc.strerror})", "Check its permissions") from None


def read_config(path: str | os.PathLike) -> ProjectConfig:
    """`[tool.gradflow]` of one pyproject.toml, every key checked."""
    path = Path(path).resolve()
    table = _read(path).get("tool", {}).get("gradflow", {})
    where = f"{path}: [tool.gradflow]"
    if not isinstance(table, dict):
        raise GradflowError(f"{where} is not a table", "Write it as a [tool.gradflow] section")
    unknown = [k for k in table if k not in KEYS]
    if unknown:
        hint = f"; did you mean {unknown[0].replace('_', '-')!r}?" if unknown[0].replace("_", "-") in KEYS else ""
        raise GradflowError(f"{where} has unknown key {unknown[0]!r}{hint}",
                            f"Use only {', '.join(KEYS)}")
    fail_on = table.get("fail-on")
    if fail_on is not None:
        fail_on = plain(FailOn.parse(fail_on, f"{where} fail-on"))
    select = table.get("select")
    if select is not None:
        select = parse_selectors(_strings(select, f"{where} select"), f"{where} select")
    ignore = parse_selectors(_strings(table.get("ignore", []), f"{where} ignore"), f"{where} ignore")
    trainable = table.get("trainable")
    if trainable is not None:
        if not isinstance(trainable, str):
            raise GradflowError(f"{where} trainable = {trainable!r} is not a string", 'Write a regex like "lora_"')

        compile_regex(trainable, what=f"{where} trainable")
    return ProjectConfig(path=str(path), fail_on=fail_on, select=select, ignore=ignore, trainable=trainable)


def _strings(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise GradflowError(f"{where} = {value!r} is not a list of strings", 'Write e.g. ["GF2", "lora-zero-init"]')


def load_config(start: str | os.PathLike | None = None) -> ProjectConfig:
    """The project's `[tool.gradflow]` (an empty ProjectConfig when there is none)."""
    path = find_pyproject(start)
    return read_config(path) if path is not None else ProjectConfig()


def resolve(*, fail_on=None, select=None, ignore=None, trainable: str | None = None, isolated: bool = False,
            start: str | os.PathLike | None = None) -> Settings:
    """Command-line values over `[tool.gradflow]` over the built-in defaults, each value checked once.

    Args:
        fail_on: error | warning | never, or None for the config's (default error).
        select, ignore: selectors from the command line (lists; items may be comma-separated), or None.
        trainable: the --trainable regex, or None for the config's.
        isolated: ignore every pyproject.toml.
        start: where the search for pyproject.toml starts (default: the current directory).
    """
    config = ProjectConfig() if isolated else load_config(start)
    layers = []
    if config.select is not None or config.ignore:
        layers.append(Layer(config.select, config.ignore, f"[tool.gradflow] in {config.path}"))
    cli_select = parse_selectors(select, "--select") if select is not None else None
    cli_ignore = parse_selectors(ignore, "--ignore") if ignore is not None else ()
    if cli_select is not None or cli_ignore:
        layers.append(Layer(cli_select, cli_ignore, "the command line"))
    chosen = plain(FailOn.parse(fail_on)) if fail_on is not None else (config.fail_on or FailOn.ERROR.value)
    return Settings(fail_on=chosen, selection=RuleSelection(tuple(layers)),
                    trainable=trainable if trainable is not None else config.trainable, config=config)
