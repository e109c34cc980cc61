"""`gradflow explain`: every code and slug documents itself, the list names them all, and torch stays unloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gradflow.rules.codes import CODES
from tests.helpers.cli import gradflow, invoke, invoke_main
from tests.helpers.env import child_env

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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_help_and_explain_do_not_import_torch(terminal):
    env = child_env(FORCE_COLOR="1") if terminal else child_env()  # a terminal renders the markdown: still no torch
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH.format(heavy=set(HEAVY))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    codes, loaded = proc.stdout.splitlines()
    assert codes == "[0, 0, 0, 0, 0, 0]"
    assert loaded == "[]", f"--help / explain imported {loaded}"


@pytest.mark.slow
def test_importtime_of_the_entry_point_has_no_torch():
    """The real `python -m gradflow.cli explain GF101`, as -X importtime sees it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradflow.cli", "explain", "GF101"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "gradflow" in imported
    assert not imported & set(HEAVY), imported & set(HEAVY)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_explain_renders_the_markdown_on_a_terminal():
    """FORCE_COLOR makes rich treat the pipe as a terminal: headings, inline code and fences are rendered."""
    run = invoke_main("explain", "GF113", env={"FORCE_COLOR": "1", "COLUMNS": "80"})
    assert run.code == 0 and run.stderr == "", run.stderr
    assert ANSI.search(run.stdout)
    text = ANSI.sub("", run.stdout)
    lines = text.splitlines()
    assert lines[0] == "GF113 inference-tensor-params (error)"
    assert not [line for line in lines if line.startswith("#")], text  # no raw '## ' headings
    assert "```" not in text and "`torch.inference_mode()`" not in text and "torch.inference_mode()" in text
    for section in DOC_SECTIONS:
        assert section in lines, section  # a heading on a line of its own
    assert "  • raises in the forward, Inference tensors cannot be saved for backward (a" in lines  # a list item
    prose = [line for line in lines if not line.startswith("    ")]  # code blocks are indented and never wrapped
    assert max(map(len, prose)) <= 80, max(prose, key=len)


def test_explain_on_a_terminal_renders_every_code(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    for code in CODES:
        run = invoke("explain", code)
        assert run.code == 0
        text = ANSI.sub("", run.stdout)
        assert "## " not in text and "```" not in text, (code, text)
        assert all(section in text for section in DOC_SECTIONS), code


def test_explain_piped_stays_markdown():
    run = invoke_main("explain", "GF113")
    assert run.code == 0 and not ANSI.search(run.stdout)
    assert "\n## What it does\n" in run.stdout and "```python\n" in run.stdout and "`torch.inference_mode()`" in run.stdout
