"""Bounds for every numeric option, in one table: a value outside them is a typo, not a setting.

Each message names the bound, so that the user learns the range from the first refusal. No torch import here:
the CLI checks its options before anything heavy loads.
"""

from __future__ import annotations

import math
import operator

from gradflow.errors import GradflowError

STEPS_MAX = 10**9  # far beyond any fine-tune, far below what overflows a step counter or a schedule
SEED_MAX = 2**32 - 1  # numpy's limit: transformers' set_seed seeds numpy too

# flag: (lowest, highest, an example to suggest, what the lowest means when it is not 1)
INTS: dict[str, tuple[int, int, int, str | None]] = {
    "--batch-size": (1, 2**16, 4, None),
    "--grad-accum": (1, 2**16, 4, None),
    "--seq-len": (1, 2**20, 512, None),  # a million tokens: beyond any context one device trains on
    "--max-steps": (1, STEPS_MAX, 100, None),
    "--check-every": (1, STEPS_MAX, 10, None),
    "--save-steps": (1, STEPS_MAX, 50, None),
    "--logging-steps": (1, STEPS_MAX, 10, None),
    "--moved-at": (1, STEPS_MAX, 5, None),
    "--tokens-per-batch": (1, 2**24, 8192, None),  # 16M tokens in one packed step: beyond any single device
    "--gc-every": (1, 10**4, 2, None),
    "--depth": (1, 10**6, 3, None),
    "--seed": (0, SEED_MAX, 0, None),
    "--lora-r": (0, 4096, 8, "no LoRA"),  # the model's hidden size caps it further once the model is known
    "--lora-alpha": (1, 2**16, 16, None),
}

# flag: (lowest, itself excluded; highest; an example to suggest). NaN and infinities are never accepted.
FLOATS: dict[str, tuple[float, float, str]] = {
    "--lr": (0.0, 10.0, "2e-4"),  # an AdamW learning rate above 10 is a typo for a fine-tune, not a setting
    "--epochs": (0.0, 1e6, "1"),
}


def check_int(flag: str, value: int) -> int:
    """`value` if it lies in INTS[flag]'s range, else GradflowError naming the range."""
    lo, hi, example, lowest_means = INTS[flag]
    try:
        value = operator.index(value)  # int, numpy and torch integers; not floats, not strings
    except TypeError:
        raise GradflowError(f"{flag} must be an integer, got {value!r}"[:200], f"Pass e.g. {flag} {example}") from None
    if lo <= value <= hi:
        return value
    if lo == 1:
        bound = f"a positive integer up to {hi}"
    elif lowest_means:
        bound = f"an integer from {lo} ({lowest_means}) to {hi}"
    else:
        bound = f"an integer from {lo} to {hi}"
    raise GradflowError(f"{flag} must be {bound}, got {_short(value)}", f"Pass e.g. {flag} {example}")


def check_float(flag: str, value: float) -> float:
    """`value` if it is finite, above FLOATS[flag]'s lowest and at most its highest, else GradflowError."""
    lo, hi, example = FLOATS[flag]
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if math.isfinite(number) and lo < number <= hi:
        return number
    raise GradflowError(f"{flag} must be a finite number above {lo:g} and at most {hi:g}, got {_short(value)}",
                        f"Pass e.g. {flag} {example}")


def _short(value) -> str:
    """A huge number as 1e+23-style text, so that the one-line message stays one short line."""
    text = str(value)
    if len(text) > 24 and isinstance(value, int):
        return f"{float(value):.3g}" if abs(value) < 1e308 else f"an integer of {len(text)} digits"
    return text[:40]


def check_positive(value: int, flag: str, example: int = 2) -> None:
    """A positive integer, within gradflow.limits' bound for `flag` when it has one."""
    if flag in INTS:
        check_int(flag, value)
    elif value <= 0:
        raise GradflowError(f"{flag} must be a positive integer, got {value}", f"Pass e.g. {flag} {example}")
