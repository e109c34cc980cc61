"""gradflow on the realistic scripts: the CLI and the API give the slug the table expects, where it expects it,
with a fix; healthy scripts come out clean; and a probe leaves the trainer's run bit-identical."""

from __future__ import annotations

import functools
import json
import os
import subprocess

import pytest
import torch

import gradflow as gf
from realistic_cases import BY_NAME, CASES, NO_BUILD, STACK, Case, params, train_and_watch
from tests.helpers.cli import CLI, invoke
from tests.helpers.coverage import assert_coverage
from tests.helpers.env import REPO, child_env

APPLICABILITY = {"safe", "unsafe", "display-only"}


def relpath(case: Case) -> str:
    return os.path.relpath(case.path, REPO)


@pytest.fixture(scope="session")
def cli_report(tmp_path_factory):
    """`cli_report(script)`: `gradflow probe-backward <script>.py:build --format json` run once, in-process (the
    interpreter start is the slow part; test_cli_in_a_real_process covers it)."""
    out = tmp_path_factory.mktemp("cli-out")

    @functools.cache
    def run(script: str) -> tuple[int, dict]:
        old = os.environ.get("OUTPUT_DIR")
        os.environ["OUTPUT_DIR"] = str(out / script)
        try:
            result = invoke("probe-backward", f"{REPO / relpath(BY_NAME[script])}:build", "--format", "json")
        finally:
            if old is None:
                os.environ.pop("OUTPUT_DIR", None)
            else:
                os.environ["OUTPUT_DIR"] = old
        assert result.code in (0, 1), (result.code, result.stdout[-2000:], result.stderr[-2000:])
        written = [f for f in _listing(out / script) or [] if not f.startswith("stage1-adapter")]
        assert not written, written  # the probe wrote nothing where the run writes (only build()'s stage-one adapter)
        return result.code, result.json()

    return run


def check_findings(case: Case, findings: list[dict], model) -> None:
    """The table's slug (and only it) among the errors and warnings, and a location and fix a user can act on."""
    errors = [f["slug"] for f in findings if f["severity"] == "error"]
    warnings = [f["slug"] for f in findings if f["severity"] == "warning"]
    if case.slug is None:
        assert not errors and not warnings, (errors, warnings)
        return
    assert (errors, warnings) == (([case.slug], []) if case.severity == "error" else ([], [case.slug])), findings
    (finding,) = [f for f in findings if f["slug"] == case.slug]
    assert finding["location"] == case.location, finding
    if case.location is not None:
        assert case.location in dict(model.named_modules())  # a module path of the model the trainer trains
    fix = finding["fix"]
    assert fix and fix["applicability"] in APPLICABILITY, finding
    assert case.fix_word in fix["title"], fix["title"]


@pytest.mark.parametrize("case", params(CASES), ids=str)
def test_cli_probe_backward(case, cli_report, tmp_path):
    code, report = cli_report(case.script)
    assert report["command"] == "probe-backward"
    assert code == (1 if case.slug and case.severity == "error" else 0), report["findings"]
    check_findings(case, report["findings"], case.build(tmp_path / "model").model)


@pytest.mark.parametrize("case", params(CASES), ids=str)
def test_api_probe_gives_the_same_findings(case, cli_report, tmp_path):
    trainer = case.build(tmp_path / "api")
    probed = gf.probe(trainer)
    assert_coverage(probed)  # every trainable tensor without a gradient is named by a finding
    report = probed.to_dict()
    check_findings(case, report["findings"], trainer.model)
    _, cli = cli_report(case.script)
    fix = lambda f: f["fix"] and {k: v for k, v in f["fix"].items() if k != "here"}  # noqa: E731
    key = lambda f: (f["code"], f["slug"], f["severity"], f["location"], fix(f))  # noqa: E731
    assert [key(f) for f in report["findings"]] == [key(f) for f in cli["findings"]]
    for api_f, cli_f in zip(report["findings"], cli["findings"]):  # the CLI adds the script's line to a Trainer fix
        here = (api_f["fix"] or {}).get("here")
        assert (here is None) == ((cli_f["fix"] or {}).get("here") is None)
        assert here is None or cli_f["fix"]["here"].startswith(f"{here} at {relpath(case)}:"), cli_f["fix"]
    # the same batch through the same seeded model: the same loss and gradients, to the bit
    assert report["loss"] == cli["loss"]
    assert report["params"] == cli["params"]


@pytest.mark.slow
def test_cli_in_a_real_process(tmp_path):
    """The command a user types, from the repository root, in fresh interpreters (run side by side: the start-up
    is most of the time): the JSON on stdout, the exit code, the script's own chatter kept off stdout."""
    cases = [BY_NAME["adapter_resume_frozen"], BY_NAME["lora_gc_non_reentrant"]]  # broken and healthy on both
    procs = [subprocess.Popen([*CLI, "probe-backward", f"{relpath(case)}:build", "--format", "json"], cwd=REPO,
                              env=child_env(OUTPUT_DIR=str(tmp_path / case.script)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for case in cases]
    for case, proc in zip(cases, procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == (1 if case.slug else 0), stderr[-2000:]
        check_findings(case, json.loads(stdout)["findings"], case.build(tmp_path / "model").model)


def test_a_factory_may_return_the_trainer_with_what_is_meant_to_train(monkeypatch, tmp_path):
    """`{'trainer': build(), 'trainable': 'lora_'}` from the user's own file, and the default text report."""
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path))
    run = invoke("probe-backward", f"{BY_NAME['adapter_resume_frozen'].path}:gradflow_check")
    assert run.code == 1, run.stderr[-2000:]
    assert "GF111 adapter-frozen" in run.stdout and "is_trainable=True" in run.stdout, run.stdout
    # the intended lora_ weights are the frozen adapter: one finding, with the fix that fits adapters
    assert "intended-param-frozen" not in run.stdout, run.stdout


@pytest.mark.skipif(STACK != "new", reason="add_adapter needs PEFT >= 0.22 only on transformers 5.x")
def test_a_script_whose_build_fails_is_a_one_line_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path))
    case = BY_NAME["add_adapter_gc"]
    assert case.behaviour == NO_BUILD
    run = invoke("probe-backward", f"{case.path}:build", "--format", "json")
    assert run.code == 2 and run.stdout == "", (run.code, run.stdout[-500:])
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("gradflow: error: factory ") and "raised ValueError" in last and "0.22.0" in last, last


def _listing(directory):
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs) \
        if os.path.exists(directory) else None


@pytest.mark.slow
@pytest.mark.parametrize("script", ["lora_gc_non_reentrant", "sft_lora", "lora_head_gc_reentrant"])
def test_probe_leaves_the_run_bit_identical(script, tmp_path):
    """A run after `gradflow.probe(trainer)` ends exactly where a run without it ends, and the probe writes nothing."""
    case = BY_NAME[script]
    plain_trainer = case.build(tmp_path / "plain")
    plain = train_and_watch(plain_trainer)
    out = tmp_path / "probed"
    probed_trainer = case.build(out)
    before, env = _listing(out), dict(os.environ)
    report = gf.probe(probed_trainer)
    assert_coverage(report)
    assert dict(os.environ) == env
    assert [f.slug for f in report.findings if f.severity == "error"] == ([case.slug] if case.slug else [])
    assert _listing(out) == before
    probed = train_and_watch(probed_trainer)
    assert plain.error is None and probed.error is None
    assert probed.losses == plain.losses
    assert probed.moved == plain.moved and probed.other_moved == plain.other_moved
    a = dict(plain_trainer.model.named_parameters())
    b = dict(probed_trainer.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_tokenizer_batch_is_probed_like_a_dict():
    """The batch users make by hand, `tokenizer(texts, return_tensors='pt')`, probes as the dict it acts as."""
    from gradflow.setup.presets import build_preset, build_tokenizer

    batch = build_tokenizer()(["the cat sat on the mat", "birds sing"], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = build_preset("tiny-llama", seed=0)
    report = gf.probe(model, batch)
    assert_coverage(report)
    assert report.to_dict()["loss"]["error"] is None and not report.findings
    batch["labels"][:] = -100
    masked = gf.probe(model, batch)
    assert_coverage(masked)
    assert [f.slug for f in masked.findings if f.severity == "error"] == ["no-supervised-tokens"]
