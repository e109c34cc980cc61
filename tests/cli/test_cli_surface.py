"""The command line's own surface: shell completion (the shell named wins; explain's codes and slugs), flags shown
without a type in --help."""

from __future__ import annotations

import pytest

from gradflow.rules.codes import CODES
from tests.helpers.cli import invoke, invoke_main

# what each shell's script carries (Typer's scripts, with gradflow's completion variable)
MARKERS = {"bash": "complete_bash", "zsh": "#compdef gradflow", "fish": "complete_fish",
           "powershell": "complete_powershell"}


@pytest.mark.parametrize("shell", sorted(MARKERS))
def test_show_completion_prints_the_shell_named_not_the_detected_one(shell):
    run = invoke_main("--show-completion", shell)
    assert run.code == 0, run.stderr
    assert MARKERS[shell] in run.stdout
    assert all(marker not in run.stdout for other, marker in MARKERS.items() if other != shell)


def test_show_completion_without_a_shell_still_detects_one_and_a_bad_shell_is_one_line():
    bare = invoke_main("--show-completion")
    # the detected shell of whatever runs the tests: a script for it, or the one line that names the shell option
    assert (bare.code == 0 and "_GRADFLOW_COMPLETE" in bare.stdout) or (
        bare.code == 2 and "Name the shell: --show-completion zsh" in bare.stderr), (bare.code, bare.stderr)
    bad = invoke_main("--show-completion", "tcsh")
    assert (bad.code, bad.stdout) == (2, "")
    assert bad.stderr.strip() == ("gradflow: error: --show-completion 'tcsh' is not one of bash, zsh, fish, "
                                  "powershell, pwsh. Pick one of those")


def test_install_completion_installs_for_the_shell_named(tmp_path):
    run = invoke_main("--install-completion", "zsh", env={"HOME": str(tmp_path)})
    assert run.code == 0, run.stderr
    assert "#compdef gradflow" in (tmp_path / ".zfunc" / "_gradflow").read_text()
    assert "zsh completion installed in" in run.stderr and run.stdout == ""  # talk on stderr


def _complete(words: str, shell: str = "bash") -> list[str]:
    args = words.split()
    cword = len(args) - (0 if words.endswith(" ") else 1)
    run = invoke_main(env={"_GRADFLOW_COMPLETE": f"complete_{shell}", "COMP_WORDS": words,
                           "COMP_CWORD": str(cword)})
    assert run.code == 0, run.stderr
    return run.stdout.split()


def test_explain_completes_codes_and_slugs():
    assert _complete("gradflow explain GF10") == [c for c in CODES if c.startswith("GF10")]
    assert _complete("gradflow explain no-") == ["no-trainable-parameters", "no-supervised-tokens"]
    assert set(_complete("gradflow explain ")) == {*CODES, *(slug for slug, _ in CODES.values())}
    assert _complete("gradflow probe-backward tiny-phi3 --gc ") == ["off", "reentrant", "non-reentrant"]


@pytest.mark.parametrize("command", ["", "inspect", "probe-backward", "patch", "explain", "train", "merge"])
def test_flags_show_no_type_in_help(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    shown = invoke(*([command] if command else []), "--help").stdout
    assert "--help" in shown and "<bool>" not in shown
    if command == "probe-backward":
        assert "<error|warning|never>" in shown and "--check-gc" in shown  # values keep their type
