"""MODEL's path through a command: which gradflow modules run, in order, and how often each is entered.

    python bench/trace_path.py probe-backward tiny-llama

A module is "entered" when one of its functions is called directly by a function of another gradflow module; the
calls one function makes into another module (a constructor, then its methods) are one entry.
Not counted: calls within a module, import-time code (a module's body, and what it calls), hooks that torch calls back (the forward trace's), and the
base modules every layer uses (errors, finding, choices, limits, models, forward, snapshot, world, noise).
"Climbs" are direct calls from a module into one of a higher layer (tests/test_layers.py's order).
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_layers import LAYERS, layer_of  # noqa: E402

BASE = len(LAYERS) - 1


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == "gradflow" or name.startswith("gradflow.") else None


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "<module>" and _module(frame) is not None:
            return True
        frame = frame.f_back
    return False


def trace(argv: list[str]):
    entered, order, climbs, seen = collections.Counter(), [], [], set()

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name == "<module>":
            return
        mod = _module(frame)
        if mod is None or layer_of(mod) == BASE:
            return
        caller = frame.f_back
        src = _module(caller) if caller is not None else None
        if src is None and not entered:  # the command itself, called by Typer
            entered[mod] += 1
            order.append(mod)
            return
        if src is None or src == mod:  # called back by torch / transformers, or a call within the module
            return
        if _importing(caller):  # import time: a module building its tables (Rule(...), Fix(...))
            return
        visit = (mod, id(caller))  # one visit per calling frame: a constructor and its methods are one entry
        if visit in seen:
            return
        seen.add(visit)
        entered[mod] += 1
        order.append(mod)
        if src is not None and layer_of(mod) < layer_of(src):
            climbs.append(f"{src}:{caller.f_code.co_name} -> {mod}:{frame.f_code.co_name}")

    from typer.testing import CliRunner

    from gradflow.cli import app

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return result.exit_code, entered, order, climbs


if __name__ == "__main__":
    code, entered, order, climbs = trace(sys.argv[1:] or ["probe-backward", "tiny-llama"])
    print(f"exit {code}; {len(entered)} modules on the path: " + " → ".join(dict.fromkeys(order)))
    print("entered more than once:")
    for mod, n in entered.most_common():
        if n > 1:
            print(f"  {n:3d}  {mod}")
    print(f"climbs back up ({len(climbs)}):")
    for line in collections.Counter(climbs).most_common():
        print(f"  {line[1]:3d}  {line[0]}")
