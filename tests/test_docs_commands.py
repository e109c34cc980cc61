"""Every `gradflow ...` command in README.md and docs/*.md shell blocks runs as written, with the exit code the page
gives it: 0, unless its comment says `exit 1` (or `exit 2`).

Each runs through the console script's main() in-process (tests.helpers.cli.invoke_main), from the repository root
as in a clone. A command that needs a file only the reader has is skipped by SKIPPED, with the reason; docs/ci.md's
workflow, action and pre-commit commands run in tests/test_docs_ci.py, and torchrun lines (docs/distributed.md) in
tests/test_distributed_probe.py.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.helpers.cli import invoke_main
from tests.helpers.env import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")

# command as written -> why it cannot run here (keep this short: a reader's own file, not a missing feature)
SKIPPED = {
    "gradflow probe-backward my_setup.py:build --fail-on warning --format sarif > gradflow.sarif":
        "the reader's factory file (the same gate on a preset runs in tests/test_docs_ci.py)",
    "gradflow probe-backward my_setup.py:build --check-gc --steps 3": "the reader's factory file",
    "gradflow probe-backward train.py:build_trainer --format json": "the reader's Trainer script",
    "gradflow probe-backward llama70b/config.json --dry-run --lora-r 16 --lora-targets all-linear --gc reentrant":
        "a downloaded Llama-3-70B config.json (bench/dry_run_70b.py runs that config)",
}


def doc_commands() -> list[tuple[str, str, int]]:
    """(page, command, expected exit code) for each line of a shell block that starts with `gradflow `."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
            if lang not in SHELL:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command, _, comment = line.strip().partition(" #")
                if command.startswith("gradflow "):
                    code = re.search(r"\bexit (\d)\b", comment)
                    found.append((page.name, " ".join(command.split()), int(code.group(1)) if code else 0))
    return found


COMMANDS = doc_commands()


def test_the_pages_have_commands_and_the_skip_list_is_current():
    written = {command for _, command, _ in COMMANDS}
    assert len(written - set(SKIPPED)) >= 5, written  # the extraction finds the examples
    assert set(SKIPPED) <= written, set(SKIPPED) - written  # a skip names a command that is still on a page
    assert all(reason for reason in SKIPPED.values())


# in the fast tier: in-process, the six commands take about 1.3 s together once torch and transformers are imported
@pytest.mark.parametrize("page, command, code", [c for c in COMMANDS if c[1] not in SKIPPED],
                         ids=[c[1] for c in COMMANDS if c[1] not in SKIPPED])
def test_the_command_runs_as_written(page, command, code):
    argv = shlex.split(command)
    assert ">" not in argv and "|" not in argv, f"{page}: give {command!r} a shell or add it to SKIPPED"
    run = invoke_main(*argv[1:], cwd=REPO)
    assert run.code == code, (page, command, run.code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
