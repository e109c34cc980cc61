"""`gradflow explain`: every code and slug documents itself, the list names them all, and torch stays unloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clirun import cli_env, gradflow, invoke
from gradflow.rules.codes import CODES

DOC_SECTIONS = ("What it does", "Why is this bad?", "Example", "Fix safety")


@pytest.mark.parametrize("code", sorted(CODES))
def test_explain_every_code_and_slug(code):
    slug = CODES[code][0]
    by_code = invoke("explain", code)
    assert by_code.code == 0, by_code.stderr
    head = by_code.stdout.splitlines()[0]
    assert head.startswith(f"{code} {slug} (")
    for section in DOC_SECTIONS:
        assert section in by_code.stdout, (code, section)
    # the slug, and the code in lower case, reach the same page
    assert invoke("explain", slug).stdout == by_code.stdout
    assert invoke("explain", code.lower()).stdout == by_code.stdout


def test_explain_without_argument_lists_every_code_and_slug():
    run = invoke("explain")
    assert run.code == 0
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == list(CODES)
    assert [r[1] for r in rows] == [slug for slug, _ in CODES.values()]
    assert {r[2] for r in rows} <= {"error", "warning", "info"}


def test_explain_json_is_data():
    listing = json.loads(invoke("explain", "--format", "json").stdout)
    assert [(r["code"], r["slug"]) for r in listing] == [(c, s) for c, (s, _) in CODES.items()]
    one = json.loads(invoke("explain", "no-trainable-parameters", "--format", "json").stdout)
    assert one["code"] == "GF110" and one["severity"] == "error" and "What it does" in one["doc"]


def test_explain_through_the_real_entry_point():
    run = gradflow("explain", "reentrant-checkpoint-no-input-grad")
    assert run.code == 0 and run.stderr == ""
    assert run.stdout.startswith("GF101 reentrant-checkpoint-no-input-grad (error)")


HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")

_NO_TORCH = """
import sys
from typer.testing import CliRunner
from gradflow.cli import app

runner = CliRunner()
codes = []
for args in (["--help"], ["explain"], ["explain", "GF101"], ["explain", "nonfinite-grad", "--format", "json"],
             ["inspect", "--help"], ["probe-backward", "--help"]):
    codes.append(runner.invoke(app, args).exit_code)
print(codes)
print(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}))
"""


def test_help_and_explain_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH.format(heavy=set(HEAVY))], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    codes, loaded = proc.stdout.splitlines()
    assert codes == "[0, 0, 0, 0, 0, 0]"
    assert loaded == "[]", f"--help / explain imported {loaded}"


def test_importtime_of_the_entry_point_has_no_torch():
    """The real `python -m gradflow.cli explain GF101`, as -X importtime sees it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradflow.cli", "explain", "GF101"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "gradflow" in imported
    assert not imported & set(HEAVY), imported & set(HEAVY)
