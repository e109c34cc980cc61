"""--baseline as linters' baselines behave (ruff, detekt, psalm): only a new finding at or above --fail-on fails.

Each state on real probes: new (an error, a warning, an info), unchanged, fixed (in the baseline, gone now), a
changed trainable set, and --fail-on never, through the CLI in-process, the library (`baseline.check`) and SARIF's
`baselineState`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import textwrap

import pytest

import gradflow
from gradflow.report.baseline import check
from gradflow.setup.options import SetupOptions
from tests.helpers.cli import invoke
from tests.helpers.sarif import assert_uploadable

SEED_BUG = "gradflow.demos:seed_bug"  # GF101 (error) at layers.0 and GF302 (info)
# with --gc non-reentrant the same model has no error: GF301 (info, lora-zero-init) and GF302 (info)
GF101_LINE = "+ new GF101 reentrant-checkpoint-no-input-grad at base_model.model.model.layers.0"

FACTORY = '''
import torch
from peft import LoraConfig, get_peft_model

from gradflow.setup.presets import build_preset


def lora():
    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def lora_bf16():  # the same trainable set, in bf16: half-precision-trainable-params (a warning)
    return lora().to(torch.bfloat16)
'''


def probe(*args, codes=(0, 1)):
    run = invoke("probe-backward", *args)
    assert run.code in codes, (run.code, run.stderr[-2000:])
    return run


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_new_error_fails_and_says_why_even_quiet(here):
    assert probe(SEED_BUG, "--gc", "non-reentrant", "--baseline", "b.json").code == 0  # written: no error
    run = probe(SEED_BUG, "--baseline", "b.json", "--format", "json", "-q")
    assert run.code == 1
    lines = run.stderr.splitlines()
    assert lines[0].startswith("gradflow: not in the baseline b.json: 1 new finding(s) at or above --fail-on error")
    assert "--update-baseline" in lines[0]
    assert f"  {GF101_LINE}" in lines
    assert "  - fixed GF301 lora-zero-init at base_model.model.model.layers.0.self_attn.o_proj.lora_A.default" in lines
    section = run.json()["baseline"]
    assert section["fails"] is True and section["status"] == "changed"
    assert section["findings"]["unchanged"] == [{"code": "GF302", "slug": "use-cache-in-training", "location": None}]
    assert [f["code"] for f in section["findings"]["added"]] == ["GF101"]


def test_fail_on_never_is_honoured_with_a_baseline(here):
    probe(SEED_BUG, "--gc", "non-reentrant", "--baseline", "b.json")
    run = probe(SEED_BUG, "--baseline", "b.json", "--fail-on", "never")
    assert run.code == 0 and "nothing fails" in run.stderr and GF101_LINE in run.stderr
    # the same from [tool.gradflow]
    (here / "pyproject.toml").write_text('[tool.gradflow]\nfail-on = "never"\n')
    assert probe(SEED_BUG, "--baseline", "b.json").code == 0


def test_a_fixed_finding_passes_with_the_hint_to_update(here):
    assert probe(SEED_BUG, "--baseline", "b.json").code == 1  # written; GF101 fails by --fail-on
    run = probe(SEED_BUG, "--baseline", "b.json", "--gc", "non-reentrant", "--format", "json")
    assert run.code == 0
    assert "  - fixed GF101 reentrant-checkpoint-no-input-grad at base_model.model.model.layers.0" in \
        run.stderr.splitlines()
    assert "pass --update-baseline to record this run" in run.stderr and "1 fixed" in run.stderr
    assert run.json()["baseline"]["fails"] is False
    assert probe(SEED_BUG, "--baseline", "b.json", "--gc", "non-reentrant", "-q").stderr == ""  # a hint: quiet
    # recorded, the fixed state matches
    assert probe(SEED_BUG, "--baseline", "b.json", "--gc", "non-reentrant", "--update-baseline").code == 0
    same = probe(SEED_BUG, "--baseline", "b.json", "--gc", "non-reentrant")
    assert same.code == 0 and "matches the baseline b.json" in same.stderr


def test_an_info_finding_appearing_does_not_fail(here):
    assert probe("tiny-llama", "--ignore", "GF301", "--baseline", "b.json").code == 0  # no finding recorded
    run = probe("tiny-llama", "--baseline", "b.json", "--fail-on", "warning")
    assert run.code == 0  # lora-zero-init is new, and info never fails
    assert any(line.startswith("  + new GF301 lora-zero-init") for line in run.stderr.splitlines())


def test_a_new_warning_fails_only_at_fail_on_warning(here):
    (here / "train_setup.py").write_text(textwrap.dedent(FACTORY))
    assert probe("train_setup.py:lora", "--baseline", "b.json").code == 0
    assert probe("train_setup.py:lora_bf16", "--baseline", "b.json").code == 0  # below --fail-on error
    run = probe("train_setup.py:lora_bf16", "--baseline", "b.json", "--fail-on", "warning")
    assert run.code == 1 and "1 new finding(s) at or above --fail-on warning" in run.stderr
    assert any(line.startswith("  + new GF203 half-precision-trainable-params") for line in run.stderr.splitlines())


def test_a_changed_trainable_set_fails_unless_never(here):
    assert probe("tiny-llama", "--baseline", "b.json").code == 0
    fewer = ("tiny-llama", "--baseline", "b.json", "--lora-targets", "q_proj,v_proj")
    run = probe(*fewer)
    assert run.code == 1 and "a changed trainable set" in run.stderr
    assert probe(*fewer, "--fail-on", "never").code == 0


def test_sarif_marks_new_unchanged_and_absent(here):
    first = json.loads(probe(SEED_BUG, "--baseline", "b.json", "--format", "sarif").stdout)
    before = {r["properties"]["slug"]: r["partialFingerprints"] for r in first["runs"][0]["results"]}
    assert all("baselineState" not in r for r in first["runs"][0]["results"])  # written: nothing compared
    run = probe(SEED_BUG, "--baseline", "b.json", "--gc", "non-reentrant", "--format", "sarif")
    assert run.code == 0
    log = assert_uploadable(json.loads(run.stdout))
    states = {r["properties"]["slug"]: r for r in log["runs"][0]["results"]}
    assert {slug: r["baselineState"] for slug, r in states.items()} == {
        "lora-zero-init": "new", "use-cache-in-training": "unchanged", "reentrant-checkpoint-no-input-grad": "absent"}
    fixed = states["reentrant-checkpoint-no-input-grad"]
    assert (fixed["kind"], fixed["level"], fixed["ruleId"]) == ("pass", "none", "GF101")
    assert fixed["message"]["text"].startswith("Fixed: reentrant-checkpoint-no-input-grad at ")
    # the unchanged finding keeps its identity; the fix has its own, so the finding's alert can close
    assert states["use-cache-in-training"]["partialFingerprints"] == before["use-cache-in-training"]
    assert fixed["partialFingerprints"] != before["reentrant-checkpoint-no-input-grad"]


def test_the_library_compares_the_same_way(tmp_path):
    bug = gradflow.probe(SEED_BUG)
    healthy = gradflow.probe(SEED_BUG, setup=SetupOptions(gc="non-reentrant"))
    path = str(tmp_path / "b.json")
    assert check(healthy, path).status == "written"
    result = check(bug, path, fail_on="error")
    assert result.fails and [f["code"] for f in result.failing] == ["GF101"]
    assert [f["code"] for f in result.findings_removed] == ["GF301"]
    assert [f["code"] for f in result.findings_unchanged] == ["GF302"]
    assert not check(bug, path, fail_on="never").fails
    assert check(healthy, path).status == "unchanged"

    check(bug, path, update=True)
    back = check(healthy, path, fail_on="warning")  # GF101 fixed, GF301 new but info
    assert back.changed and not back.fails and back.failing == []
    assert back.to_dict()["findings"]["removed"][0]["code"] == "GF101"

    # a baseline recorded under an older code: the slug (the stable contract) names the rule
    from gradflow.report.render.sarif import to_sarif

    old = {"code": "GF999", "slug": "reentrant-checkpoint-no-input-grad", "location": "model.layers.0"}
    section = {"file": "b.json", "status": "changed", "findings": {"added": [], "removed": [old], "unchanged": []}}
    log = assert_uploadable(to_sarif(dataclasses.replace(healthy, baseline=section), source=SEED_BUG))
    (absent,) = [r for r in log["runs"][0]["results"] if r["baselineState"] == "absent"]
    assert absent["ruleId"] == "GF101" and absent["level"] == "none"


@pytest.mark.parametrize("deselect", [("--select", "GF3"), ("--ignore", "reentrant-checkpoint-no-input-grad"),
                                      "config"])
def test_a_deselected_rule_is_never_fixed_and_an_update_keeps_it(here, deselect):
    assert probe(SEED_BUG, "--baseline", "b.json").code == 1  # written: GF101 (error) and GF302 (info)
    if deselect == "config":
        (here / "pyproject.toml").write_text('[tool.gradflow]\nignore = ["GF1"]\n')
        deselect = ()
    run = probe(SEED_BUG, "--baseline", "b.json", *deselect, "--format", "sarif")
    assert run.code == 0 and "fixed" not in run.stderr and "--update-baseline" not in run.stderr
    assert "matches the baseline b.json" in run.stderr  # GF101 was not looked for: not judged
    log = assert_uploadable(json.loads(run.stdout))
    assert [r["baselineState"] for r in log["runs"][0]["results"]] == ["unchanged"]  # GF302, and no absent result
    assert probe(SEED_BUG, "--baseline", "b.json", *deselect, "--update-baseline").code == 0
    recorded = json.loads((here / "b.json").read_text())["findings"]
    assert [f["code"] for f in recorded] == ["GF101", "GF302"]  # the update kept the deselected rule's entry
    # with the rule selected again, the baseline still holds it: unchanged, and a real fix is still "fixed"
    assert "matches the baseline" in probe(SEED_BUG, "--baseline", "b.json", "--isolated").stderr
    fixed = probe(SEED_BUG, "--baseline", "b.json", "--isolated", "--gc", "non-reentrant")
    assert "  - fixed GF101 reentrant-checkpoint-no-input-grad at base_model.model.model.layers.0" in fixed.stderr


def test_a_baseline_of_another_model_or_command_says_so_in_one_note(here):
    subprocess.run(["git", "init", "-q", str(here)], check=True)  # the repository its paths are named from
    (here / "train_setup.py").write_text(textwrap.dedent(FACTORY))
    assert probe("./train_setup.py:lora", "--baseline", "b.json").code == 0
    # the same factory spelled another way, from another folder of the repository: the same setup, no note
    (here / "sub").mkdir()
    same = invoke("probe-backward", "../train_setup.py:lora", "--baseline", "../b.json", cwd=here / "sub")
    assert same.code == 0 and "note" not in same.stderr and "matches the baseline" in same.stderr
    other = probe("tiny-llama", "--baseline", "b.json", "--lora-targets", "q_proj")
    notes = [line for line in other.stderr.splitlines() if line.startswith("gradflow: note: the baseline")]
    assert notes == ["gradflow: note: the baseline b.json was recorded for probe-backward ./train_setup.py:lora, "
                     "not this run's probe-backward tiny-llama; pass --update-baseline to record this setup, or "
                     "keep one baseline per MODEL"]
    assert other.code == 1  # its trainable set differs: still compared, and said why
    run = invoke("inspect", "train_setup.py:lora", "--baseline", "b.json")
    assert "was recorded for probe-backward ./train_setup.py:lora, not this run's inspect" in run.stderr
    # a baseline written before model_id was recorded: its model as typed, named the same way
    data = json.loads((here / "b.json").read_text())
    assert data.pop("model_id") == "file:train_setup.py:lora"
    (here / "b.json").write_text(json.dumps(data))
    assert "note" not in probe("train_setup.py:lora", "--baseline", "b.json").stderr
