"""The coverage invariant (issue 18): after a probe, every trainable tensor with a None or exactly-zero gradient is
named by a finding, apart from the documented exemptions. Every rule test checks it through assert_fires /
assert_silent / assert_healthy; the `grad-missing-unexplained` fallbacks met on the way are counted (the terminal
summary prints the count), and GRADFLOW_STRICT_COVERAGE=1 fails a test on any."""

from __future__ import annotations

import os
import re
import weakref

FALLBACK = "grad-missing-unexplained"
# findings about the whole step: they explain every missing gradient (SPEC §5, docs/findings.md "Coverage")
WHOLE_STEP = {"loss-detached", "no-supervised-tokens", "no-trainable-parameters", "nested-checkpoint"}
_EXPERT = re.compile(r"^(.*\.experts)\.\d+(\.|$)")

# (test id, report id) -> fallback findings in that report; read by tests/conftest.py's terminal summary
SEEN: dict[tuple[str, int], int] = {}
# reports in which a test asserts the fallback itself (the rule's own cases): neither counted nor strict-failed
_EXPECTED: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def uncovered(report) -> list[str]:
    """Trainable parameters with a None or zero gradient that no finding names (exemptions left out)."""
    snap = getattr(report, "snapshot", None)
    if snap is None or not snap.probed or snap.loss is None or snap.loss.error is not None:
        return []  # no backward, or an exception in the step: missing gradients say nothing
    if any(f.slug in WHOLE_STEP for f in report.findings):
        return []
    named = {n for f in report.findings for n in f.params}
    broken = [f.location for f in report.findings if f.slug == "nonfinite-grad" and f.location]
    ran_experts = {m.group(1) for mod in snap.modules if mod.ran and (m := _EXPERT.match(mod.name))}
    later = {s.name for s in snap.steps.params if s.grad == "ok"} if snap.steps is not None else set()
    left = []
    for p in snap.params:
        if not p.requires_grad or p.grad not in ("none", "zero") or p.name in named:
            continue
        expert = _EXPERT.match(p.module)
        if p.used is False and expert and expert.group(1) in ran_experts:
            continue  # exempt: an expert the router did not pick in this batch
        if p.grad == "zero" and ".lora_A." in p.name:
            continue  # exempt: lora_A's first gradient is zero while lora_B is (lora-zero-init)
        if p.grad == "zero" and ".trainable_tokens_delta." in p.name:
            continue  # exempt: trainable-token rows of ids the batch does not contain
        if p.grad == "zero" and p.name in later:
            continue  # exempt: a nonzero gradient at one of the --steps (it starts at zero)
        if p.grad == "zero" and any(p.module == b or p.module.startswith(b + ".") for b in broken):
            continue  # covered: a zero beside NaN/Inf in the module nonfinite-grad names
        left.append(p.name)
    return left


def assert_coverage(report, *, fallback_expected: bool = False) -> None:
    """No trainable tensor without a gradient is left unexplained; fallbacks are counted (and fail when strict),
    except in a report whose test asserts the fallback itself (`fallback_expected`): the rule's own cases."""
    if fallback_expected:
        _EXPECTED[id(report)] = report
    for part in (report, getattr(report, "before", None), getattr(report, "after", None)):
        if part is None:
            continue
        left = uncovered(part)
        assert not left, f"coverage: {len(left)} trainable tensors without a gradient and no finding: {left[:6]}"
        expected = _EXPECTED.get(id(part)) is part
        fallback = [] if expected else [f for f in part.findings if f.slug == FALLBACK]
        SEEN[(os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], id(part))] = len(fallback)
        if fallback and os.environ.get("GRADFLOW_STRICT_COVERAGE") == "1":
            raise AssertionError(f"coverage fallback: {fallback[0].message}")


def fallback_count() -> tuple[int, int]:
    """(fallback findings, tests that met one) over the run so far."""
    tests = {test for (test, _), n in SEEN.items() if n}
    return sum(SEEN.values()), len(tests)
