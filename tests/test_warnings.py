"""Warnings: the CLI hides only the noise gradflow's own runs provoke; the user's warnings reach stderr, and the
Python API installs no warning filter at all.

(pyproject's pytest `filterwarnings` only concern this test session; everything here runs in fresh processes,
and is marked slow; the two checks of the filters themselves run in this one.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.cli import gradflow
from tests.helpers.env import child_env

FACTORY = '''
import warnings

import torch


class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        warnings.warn("user warning XYZ from the forward")
        return self.lin(x)


def build():
    warnings.warn("user warning XYZ from the factory")
    warnings.warn("user deprecation XYZ", FutureWarning)
    return {"model": Noisy(), "batch": torch.randn(2, 4), "loss_fn": lambda m, b: m(b).sum()}
'''


@pytest.mark.slow
@pytest.mark.parametrize("command", ["probe-backward", "inspect", "patch"])
def test_the_users_own_warnings_reach_stderr(tmp_path, command):
    factory = tmp_path / "noisy.py"
    factory.write_text(FACTORY)
    run = gradflow(command, f"{factory}:build")
    assert run.code in (0, 1), run.stderr[-2000:]
    assert "UserWarning: user warning XYZ from the factory" in run.stderr
    assert "UserWarning: user warning XYZ from the forward" in run.stderr
    assert "FutureWarning: user deprecation XYZ" in run.stderr
    assert "user warning XYZ" not in run.stdout  # stdout stays data


@pytest.mark.slow
@pytest.mark.parametrize("args", [["probe-backward", "gradflow.demos:seed_bug"], ["patch", "gradflow.demos:seed_bug"],
                                  ["inspect", "tiny-phi3"], ["probe-backward", "tiny-mixtral"]], ids=" ".join)
def test_gradflows_own_noise_stays_off_stderr(args):
    """The probe provokes torch's checkpoint warning on purpose, and gradflow's LoRA and demos trip PEFT and
    transformers deprecations: none of it is the user's to act on."""
    run = gradflow(*args)
    assert run.code in (0, 1), run.stderr[-2000:]
    assert "Warning" not in run.stderr and "warnings.warn" not in run.stderr, run.stderr


_API = '''
import warnings

before = list(warnings.filters)
import gradflow
from gradflow.demos import seed_bug

setup = seed_bug()
report = gradflow.probe(setup["model"], setup["batch"])
text = str(report)
assert "GF101" in text
report = gradflow.inspect(setup["model"], setup["batch"])
# (action, message, category, module, lineno): an "ignore" without a message hides a whole category
catch_all = [f for f in warnings.filters if f[0] == "ignore" and not (f[1] and f[1].pattern)
             and f[2] in (Warning, UserWarning) and not (f[3] and f[3].pattern)]
# a Python category (UserWarning, FutureWarning, ...) ignored everywhere; libraries may scope filters to their own
# modules (torch.optim.lr_scheduler) or categories (urllib3's DependencyWarning): those are their business
category_wide = [f[2].__name__ for f in warnings.filters
                 if f not in before and f[0] == "ignore" and not (f[1] and f[1].pattern) and not (f[3] and f[3].pattern)
                 and f[2].__module__ == "builtins"]
print("CATCH_ALL", catch_all)
print("CATEGORY_WIDE", category_wide)
'''


@pytest.mark.slow
def test_the_api_installs_no_process_wide_warning_filter():
    proc = subprocess.run([sys.executable, "-c", _API], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["CATCH_ALL"] == "[]", out
    assert out["CATEGORY_WIDE"] == "[]", out  # nor one that hides a whole category
    # the probe runs the reentrant regions it diagnoses; through the API, torch's warning about it is the user's
    assert "None of the inputs have requires_grad=True" in proc.stderr


def test_the_known_noise_filters_are_targeted():
    """Each filter (the CLI's, and train's around Trainer) names a message; none silences a whole category."""
    from gradflow.noise import KNOWN_NOISE

    assert KNOWN_NOISE
    for category, message in KNOWN_NOISE:
        assert issubclass(category, Warning) and len(message) >= 20, (category, message)


def test_the_kernel_hub_log_lines_bitsandbytes_provokes_are_dropped_and_nothing_else(caplog):
    """transformers 5.25 installs `kernels`; importing bitsandbytes (PEFT does) then logs about a hub kernel."""
    import logging

    from gradflow.noise import ignore_known_noise

    hub = logging.getLogger("kernels._internals.hf_hub")
    saved = list(hub.filters)
    try:
        hub.filters[:] = []  # an earlier in-process CLI run may have added gradflow's filter already
        ignore_known_noise()
        ignore_known_noise()  # idempotent: one filter, however often the CLI and train call it
        assert len(hub.filters) == 1
        with caplog.at_level(logging.WARNING, logger="kernels._internals.hf_hub"):
            hub.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                        "Hugging Face Hub is in offline mode.")
            hub.warning("Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is in "
                        "offline mode.")
        assert [r.getMessage()[:60] for r in caplog.records] == [
            "Skipping publisher trust check for 'someone/their-kernel' be"]
    finally:
        hub.filters[:] = saved
