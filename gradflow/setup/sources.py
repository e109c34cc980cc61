"""MODEL → a training setup: presets, local directories, hub ids and factories."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Callable

from gradflow.errors import GradflowError
from gradflow.models import is_trainer
from gradflow.setup.presets import PRESETS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Kind(str, enum.Enum):
    """Where a Setup came from. A str, so that the value is what report.json and messages show."""

    PRESET = "preset"
    DIR = "dir"
    CONFIG = "config"  # a config.json: enough for --dry-run, no weights
    HUB = "hub"
    FACTORY = "factory"
    TRAINER = "trainer"
    OBJECT = "object"  # an nn.Module handed over by the caller (the API, train's own build): trained in place

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class Setup:
    """What gradflow works on: the model and, from a factory, the user's batch, loss, optimizer and intent."""

    model: Any
    kind: Kind
    source: str
    batch: Any = None
    loss_fn: Callable | None = None
    optimizer: Any = None
    trainable: str | None = None
    tokenizer: Any = None
    preset: str | None = None
    # a Trainer's DDP settings, for the rules to judge before the run is launched under torchrun
    find_unused_parameters: bool | None = None
    static_graph: bool = False
    lr_scheduler: Any = None  # a factory's (or a Trainer's) scheduler, stepped by --steps
    fsdp_plan: Any = None  # a Trainer's FSDP1 units, planned before wrapping (gradflow.setup.trainer_source.fsdp1_plan)
    hints: dict = dataclasses.field(default_factory=dict)  # slug -> the fix that fits a Trainer's own args


def resolve(spec: str, *, trust_remote_code: bool = False, named_in: str | None = None) -> Setup:
    """Turn a MODEL argument into a Setup, or raise GradflowError saying what to do.

    The readers in READERS are tried in order; the first that recognises `spec` answers (a Setup, or an error
    that says what to pass instead). `named_in` says which file the spec was read from (an adapter config, run
    metadata), for a spec the user did not type. Such a spec resolves as a preset, directory or hub id only: a
    factory in it would run code that someone else wrote, so it is refused unless `trust_remote_code` is set.
    """
    for reader in READERS:
        setup = reader(spec, trust_remote_code=trust_remote_code, named_in=named_in)
        if setup is not None:
            return setup
    names = ", ".join(sorted(PRESETS))
    raise GradflowError(f"unknown preset {spec!r}", f"Use one of: {names}; or a directory, hub id, or FILE.py:FUNCTION")


def _preset(spec: str, **_) -> Setup | None:
    return Setup(model=None, kind=Kind.PRESET, source=spec, preset=spec) if spec in PRESETS else None


def _directory(spec: str, **_) -> Setup | None:
    return Setup(model=None, kind=Kind.DIR, source=spec) if os.path.isdir(spec) else None


def _code_named_in_a_file(spec: str, *, trust_remote_code: bool, named_in: str | None) -> None:
    if named_in is not None and names_code(spec) and not trust_remote_code:
        raise GradflowError(f"{named_in} names the Python factory {spec!r} as the base model, and gradflow runs "
                            "code read from a file only when told to",
                            "Read that code, then pass --trust-remote-code to run it; or set the base to a preset, "
                            "model directory or hub id")


def _factory(spec: str, **_) -> Setup | None:
    return load_factory(spec) if _looks_like_factory(spec) else None


def _file(spec: str, **_) -> Setup | None:
    if os.path.isfile(spec) and spec.lower().endswith(".json"):
        return Setup(model=None, kind=Kind.CONFIG, source=spec)  # a config.json: enough for --dry-run, no weights
    if os.path.exists(spec):
        raise GradflowError(f"{spec} is a file, not a model directory or factory",
                            "Pass a directory written by save_pretrained, or FILE.py:FUNCTION")
    return None


def _hub_id(spec: str, **_) -> Setup | None:
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return Setup(model=None, kind=Kind.HUB, source=spec)
    if os.sep in spec or spec.startswith("."):
        raise GradflowError(f"no such directory: {spec}", "Check the path, or pass a preset name")
    return None


# MODEL readers, first match wins (PEFT's dispatch-list manner): a new kind of source is one reader and one entry
READERS = (_preset, _directory, _code_named_in_a_file, _factory, _file, _hub_id)


def _looks_like_factory(spec: str) -> bool:
    return ":" in spec and not os.path.exists(spec)


def names_code(spec: str) -> bool:
    """Whether resolving `spec` could import Python: a factory (`file.py:func`, `module:func`) or a .py file."""
    return _looks_like_factory(spec) or spec.rstrip().lower().endswith(".py")


class OsExit(SystemExit):
    """os._exit(code) called by user code while gradflow runs it (see os_exit_refused)."""


@contextlib.contextmanager
def os_exit_refused():
    """Within: os._exit(code) in this process raises OsExit, so a factory that ends the process at once (exit 0,
    empty stdout) cannot pass a CI gate; a forked child (a DataLoader worker, multiprocessing) still exits."""
    real, pid = os._exit, os.getpid()

    def refuse(code):
        if os.getpid() != pid:
            real(code)
        raise OsExit(code)

    os._exit = refuse
    try:
        yield
    finally:
        os._exit = real


def user_exit_error(exc: BaseException, source: str, during: str) -> GradflowError:
    """SystemExit or KeyboardInterrupt raised by the user's code, as an error: a factory that exits (even with
    code 0) has not built anything, and must never pass a CI gate as a clean run."""
    if isinstance(exc, OsExit):
        return GradflowError(f"factory {source} called os._exit({exc.code!r}) while {during}{_where(exc)}",
                             "A factory must return the model (or raise an error), not end the process: remove "
                             "that os._exit call")
    if isinstance(exc, SystemExit):
        return GradflowError(f"factory {source} raised SystemExit({exc.code!r}) while {during}{_where(exc)}",
                             "A factory must return the model (or raise an error), not exit: remove that exit call")
    return GradflowError(f"factory {source} was interrupted (KeyboardInterrupt) while {during}{_where(exc)}",
                         "Remove the KeyboardInterrupt from the factory, or run again if you pressed Ctrl-C")


def load_factory(spec: str) -> Setup:
    """Import `file.py:name` or `package.module:name` and take what `name` is: a function to call, or an object.

    The factory is user code and behaves as it would when run as a script: its folder is on sys.path (sibling
    imports work), and whatever it prints goes to stderr, so `--format json|sarif` stays valid on stdout.
    """

    target, _, func_name = spec.rpartition(":")
    if not target or not func_name:
        raise GradflowError(f"bad factory {spec!r}", "Write it as path/to/file.py:function or package.module:function")
    with contextlib.redirect_stdout(sys.stderr):
        module = _import_target(target, spec)
        obj = getattr(module, func_name, None)
        if obj is None:
            raise GradflowError(f"{target} has no function or object {func_name!r}", "Check the name after the ':'")
        if not _is_setup_object(obj):
            if not callable(obj):
                raise GradflowError(f"{target}:{func_name} is a {type(obj).__name__}, not a function, model, dict "
                                    "or Trainer", "Point at a function that returns the model (or a dict with 'model')")
            try:
                obj = obj()
            except (SystemExit, KeyboardInterrupt) as exc:
                raise user_exit_error(exc, spec, "building the model") from exc
            except Exception as exc:
                raise GradflowError(f"factory {spec} raised {type(exc).__name__}: {_first_line(exc)}{_where(exc)}",
                                    "Fix the factory so that it builds the model, then run again") from exc
    return setup_from_factory_result(obj, spec)


def _import_target(target: str, spec: str):
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise GradflowError(f"factory file not found: {target}", "Check the path before the ':'")
        folder = os.path.dirname(os.path.abspath(target))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # as `python file.py` would: sibling modules import
        mod_name = f"_gradflow_factory_{abs(hash(os.path.abspath(target)))}"
        try:
            spec_obj = importlib.util.spec_from_file_location(mod_name, target)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        except (SystemExit, KeyboardInterrupt) as exc:
            sys.modules.pop(mod_name, None)
            raise user_exit_error(exc, spec, f"importing {target}") from exc
        except Exception as exc:  # the user's file: any error is theirs to fix
            sys.modules.pop(mod_name, None)
            raise GradflowError(f"factory file {target} failed to import: {type(exc).__name__}: {_first_line(exc)}"
                                f"{_where(exc)}",
                                "Fix the error in that file, then run again") from exc
        return module
    try:
        return importlib.import_module(target)
    except (SystemExit, KeyboardInterrupt) as exc:
        raise user_exit_error(exc, spec, f"importing {target}") from exc
    except ModuleNotFoundError as exc:
        raise GradflowError(f"cannot import module {target!r} for factory {spec}: {_first_line(exc)}",
                            "Check the module name, or that it is installed / on PYTHONPATH") from exc
    except Exception as exc:
        raise GradflowError(f"module {target} failed to import: {type(exc).__name__}: {_first_line(exc)}{_where(exc)}",
                            "Fix the error in that module, then run again") from exc


def _is_setup_object(obj: Any) -> bool:
    """A model, a dict or a Trainer defined at module level is used as it is (an nn.Module is callable too)."""
    if isinstance(obj, dict):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return True

    return is_trainer(obj)


def setup_from_factory_result(result: Any, source: str) -> Setup:
    """Check a factory's return value: an nn.Module, a Trainer, or a dict with `model` or `trainer`."""
    import torch

    if isinstance(result, torch.nn.Module):
        return Setup(model=result, kind=Kind.FACTORY, source=source)
    if is_trainer(result):
        return Setup(model=result, kind=Kind.TRAINER, source=source)
    if isinstance(result, dict) and "trainer" in result:
        if not is_trainer(result["trainer"]):
            raise GradflowError(f"factory {source} returned a dict whose 'trainer' is "
                                f"{type(result['trainer']).__name__}, not a transformers Trainer",
                                "Return {'trainer': trainer} with a Trainer (or SFTTrainer) under 'trainer'")
        unknown = set(result) - {"trainer", "trainable"}
        if unknown:
            raise GradflowError(f"factory {source} returned unknown keys beside 'trainer': {', '.join(sorted(unknown))}",
                                "The trainer supplies model, batch, loss and optimizer; add only 'trainable'")
        trainable = result.get("trainable")
        if trainable is not None:
            compile_regex(trainable, what=f"factory {source}: 'trainable'")
        return Setup(model=result["trainer"], kind=Kind.TRAINER, source=source, trainable=trainable)
    if isinstance(result, dict):
        model = result.get("model")
        if not isinstance(model, torch.nn.Module):
            raise GradflowError(f"factory {source} returned a dict whose 'model' is {type(model).__name__}, not an nn.Module",
                                "Return {'model': module, ...} with an nn.Module under 'model'")
        unknown = set(result) - {"model", "batch", "loss_fn", "optimizer", "lr_scheduler", "trainable", "tokenizer"}
        if unknown:
            raise GradflowError(f"factory {source} returned unknown keys: {', '.join(sorted(unknown))}",
                                "Use only model, batch, loss_fn, optimizer, lr_scheduler, trainable, tokenizer")
        loss_fn = result.get("loss_fn")
        if loss_fn is not None and not callable(loss_fn):
            raise GradflowError(f"factory {source}: 'loss_fn' is not callable", "Pass a function loss_fn(model, batch) -> loss")
        trainable = result.get("trainable")
        if trainable is not None:
            compile_regex(trainable, what=f"factory {source}: 'trainable'")
        return Setup(model=model, kind=Kind.FACTORY, source=source, batch=result.get("batch"), loss_fn=loss_fn,
                     optimizer=result.get("optimizer"), trainable=trainable, tokenizer=result.get("tokenizer"),
                     lr_scheduler=result.get("lr_scheduler"))
    raise GradflowError(f"factory {source} returned {type(result).__name__}, not an nn.Module, Trainer or dict",
                        "Return an nn.Module, a Trainer, or a dict with 'model' (and optional batch, loss_fn, "
                        "optimizer, trainable)")


def compile_regex(pattern: str, *, what: str = "--trainable"):
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise GradflowError(f"{what} is not a valid regular expression ({pattern!r}: {exc})",
                            "Fix the pattern, e.g. 'lora_|so8'") from exc


def _where(exc: BaseException) -> str:
    """' (at file.py:LINE)': the innermost frame of the user's code, so the one-line error points at the fix."""
    import traceback

    if isinstance(exc, SyntaxError):
        return ""  # its message already names the file and line
    import sysconfig

    # skip gradflow's own frames and installed libraries': the user's line is the one to fix
    skip = {os.path.dirname(os.path.abspath(__file__))}
    skip.update(os.path.abspath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib"))
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = frame.filename
        if name.startswith("<") or any(os.path.abspath(name).startswith(p + os.sep) for p in skip):
            continue
        rel = os.path.relpath(name)
        return f" (at {name if rel.startswith('..') else rel}:{frame.lineno})"
    return ""


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, cut short: some libraries put whole lists in theirs."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
