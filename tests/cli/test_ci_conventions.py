"""CI conventions: --select/--ignore, [tool.gradflow], --baseline, --quiet, choices, python -m gradflow, completion."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from gradflow.report.baseline import compact_names, expand_names, write_json_atomic
from gradflow.report.config import find_pyproject, read_config, resolve
from gradflow.errors import GradflowError
from gradflow.report.selection import Layer, RuleSelection, parse_selector, parse_selectors
from tests.helpers.cli import assert_one_line_error, invoke, invoke_main
from tests.helpers.env import REPO, child_env

SEED_BUG = "gradflow.demos:seed_bug"  # GF101 (error) at layers.0 and GF302 (info)


def _toml(folder, body: str):
    path = folder / "pyproject.toml"
    path.write_text(body)
    return path


def _codes(run) -> list[str]:
    return sorted(f["code"] for f in run.json()["findings"])


# ----- selection (library) -------------------------------------------------------------------------------------
def test_selectors_take_codes_prefixes_slugs_and_all():
    assert parse_selector("GF101", "--select").prefix == "GF101"
    assert parse_selector("gf101", "--select").prefix == "GF101"
    assert parse_selector("reentrant-checkpoint-no-input-grad", "--select").prefix == "GF101"
    prefix = parse_selector("GF2", "--select")
    assert prefix.matches("GF201") and prefix.matches("GF205") and not prefix.matches("GF101")
    assert parse_selector("ALL", "--select").matches("GF402")
    assert [s.prefix for s in parse_selectors(["GF1,lora-zero-init", " GF20 "], "--ignore")] == ["GF1", "GF301", "GF20"]


@pytest.mark.parametrize("bad", ["GF9", "XY", "no-such-slug", "GF1011"])
def test_an_unknown_selector_is_one_error_naming_where(bad):
    with pytest.raises(GradflowError) as err:
        parse_selectors([f"GF101,{bad}"], "--ignore")
    assert f"--ignore {bad!r} is not a finding code" in err.value.line()
    assert "gradflow explain" in err.value.line()


def test_layers_follow_ruff_select_resets_ignore_narrows_specific_wins():
    sel = lambda *t: parse_selectors(list(t), "x")  # noqa: E731
    config = Layer(sel("GF1"), sel("GF101"), "config")
    only_config = RuleSelection((config,))
    assert [only_config.allows(c) for c in ("GF101", "GF102", "GF201")] == [False, True, False]
    # a command-line ignore narrows what the config left on
    narrowed = RuleSelection((config, Layer(None, sel("nested-checkpoint"), "cli")))
    assert [narrowed.allows(c) for c in ("GF101", "GF102", "GF103")] == [False, False, True]
    # a command-line select starts afresh: the config's ignore goes with its select
    fresh = RuleSelection((config, Layer(sel("ALL"), (), "cli")))
    assert fresh.allows("GF101") and fresh.allows("GF201")
    # the more specific selector wins inside a layer, and ignore wins a tie
    assert RuleSelection((Layer(sel("GF101"), sel("GF1")),)).allows("GF101")
    assert not RuleSelection((Layer(sel("GF1"), sel("GF101")),)).allows("GF101")
    assert not RuleSelection((Layer(sel("GF101"), sel("reentrant-checkpoint-no-input-grad")),)).allows("GF101")
    assert RuleSelection().allows("GF101") and not RuleSelection().active


# ----- [tool.gradflow] (library) -----------------------------------------------------------------------------
def test_config_is_the_nearest_pyproject_with_the_table(tmp_path):
    top = _toml(tmp_path, '[tool.gradflow]\nfail-on = "warning"\nignore = ["GF3"]\ntrainable = "lora_"\n')
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    _toml(tmp_path / "pkg", '[project]\nname = "x"\n[tool.ruff]\nline-length = 100\n')  # no table: passed over
    assert find_pyproject(tmp_path / "pkg" / "sub") == top
    settings = resolve(start=tmp_path / "pkg" / "sub")
    assert (settings.fail_on, settings.trainable, settings.config.path) == ("warning", "lora_", str(top))
    assert not settings.selection.allows("GF301") and settings.selection.allows("GF101")
    # flags win over keys; --isolated reads no file
    over = resolve(fail_on="never", trainable="so8", select=["GF3"], start=tmp_path)
    assert (over.fail_on, over.trainable) == ("never", "so8") and over.selection.allows("GF301")
    assert resolve(isolated=True, start=tmp_path).fail_on == "error"
    nearer = _toml(tmp_path / "pkg" / "sub", '[tool.gradflow]\nselect = ["ALL"]\n')
    assert find_pyproject(tmp_path / "pkg" / "sub") == nearer


@pytest.mark.parametrize("body, needles", [
    ('fail-on = "sometimes"', ["fail-on 'sometimes' is not error, warning or never"]),
    ('fail_on = "warning"', ["unknown key 'fail_on'", "did you mean 'fail-on'"]),
    ('exclude = ["x"]', ["unknown key 'exclude'", "fail-on, select, ignore, trainable"]),
    ('select = "GF1"\nignore = ["GF7"]', ["ignore 'GF7' is not a finding code"]),
    ('select = [1, 2]', ["select = [1, 2] is not a list of strings"]),
    ('trainable = "lora_(["', ["trainable is not a valid regular expression"]),
    ('trainable = 3', ["trainable = 3 is not a string"]),
    ('fail-on = ', ["not valid TOML"]),
])
def test_a_bad_config_is_one_error_naming_file_and_key(tmp_path, body, needles):
    path = _toml(tmp_path, f"[tool.gradflow]\n{body}\n")
    with pytest.raises(GradflowError) as err:
        read_config(path)
    line = err.value.line()
    assert str(path) in line and "\n" not in line
    for needle in needles:
        assert needle in line, (needle, line)


def test_a_bad_config_stops_the_real_cli_with_one_line(tmp_path):
    _toml(tmp_path, '[tool.gradflow]\nfail-on = "sometimes"\n')
    line = assert_one_line_error(invoke_main("probe-backward", "tiny-llama", cwd=tmp_path),
                                 "pyproject.toml: [tool.gradflow] fail-on 'sometimes'", "Pick one of those")
    assert str(tmp_path) in line
    assert invoke_main("explain", "GF101", cwd=tmp_path).code == 0  # explain reads no config


# ----- choices, entry points, completion ---------------------------------------------------------------------
def test_choice_options_are_real_choices_in_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside a <a|b|c> list
    probe = invoke("probe-backward", "--help").stdout
    for shown in ("<error|warning|never>", "<off|reentrant|non-reentrant>", "<none|4bit|8bit>", "<text|json|sarif>",
                  "<auto|cpu|cuda>", "<auto|float32|bfloat16|float16|fp32|bf16|fp16>", "--select", "--baseline",
                  "--quiet"):
        assert shown in probe, shown
    assert "<text|json>" in invoke("inspect", "--help").stdout
    train = invoke("train", "--help").stdout
    assert "<fp32|bf16|fp16>" in train and "<completion|all>" in train and "--quiet" in train


@pytest.mark.parametrize("args, needles", [
    (["probe-backward", "tiny-phi3", "--fail-on", "maybe"], ["--fail-on 'maybe' is not error, warning or never"]),
    (["train", "tiny-phi3", "--data", "d.jsonl", "--output", "o", "--precision", "fp8"],
     ["--precision 'fp8' is not one of fp32, bf16, fp16"]),
    (["probe-backward", "tiny-phi3", "--batch-size", "two"], ["Invalid value for '--batch-size'", "--help"]),  # Click's
    (["probe-backward", "tiny-phi3", "--select", "GF1,GF9"], ["--select 'GF9' is not a finding code"]),
])
def test_bad_values_are_one_line_through_the_real_cli(tmp_path, args, needles):
    assert_one_line_error(invoke_main(*args, cwd=tmp_path), *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["inspect", "tiny-phi3", "--format", "sarif"], "--format 'sarif' is not one of text, json. Pick one of those"),
    (["probe-backward", "tiny-phi3", "--device", "cuda:x"], "--device 'cuda:x' is not auto, cpu or cuda"),
    (["train", "tiny-phi3", "--data", "d.jsonl", "--output", "o", "--loss-on", "prompt"],
     "--loss-on 'prompt' is not one of completion, all"),
    (["probe-backward", "tiny-phi3", "--dtype", "float8"], "--dtype 'float8' is not a known dtype"),
])
def test_a_bad_choice_is_the_library_error_raised_while_parsing(args, message):
    with pytest.raises(GradflowError) as err:  # main() prints it as the one line (the cases above)
        invoke(*args)
    assert err.value.line().startswith(message)


def test_the_library_validates_with_the_same_choices():
    from gradflow.choices import GC, Precision, LossOn, Quant
    from gradflow.setup.options import GC_MODES, QUANT_MODES, SetupOptions
    from gradflow.training.options import LOSS_ON, PRECISIONS

    assert (GC_MODES, QUANT_MODES, PRECISIONS, LOSS_ON) == (GC.values(), Quant.values(), Precision.values(),
                                                            LossOn.values())
    opts = SetupOptions(gc=GC.REENTRANT, quant="4bit", dtype="bf16", device="cuda:1")
    opts.validate()
    assert (type(opts.gc), opts.gc, opts.device) == (str, "reentrant", "cuda:1")
    with pytest.raises(GradflowError, match="--gc 'sideways' is not one of off, reentrant, non-reentrant"):
        SetupOptions(gc="sideways").validate()


def test_update_baseline_needs_a_baseline():
    run = invoke("probe-backward", "tiny-phi3", "--update-baseline")
    assert run.code == 2 and "--update-baseline has no file to write. Pass --baseline FILE with it" in run.stderr


@pytest.mark.slow
def test_python_dash_m_gradflow_is_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gradflow", "--version"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "gradflow 0.1.0")
    proc = subprocess.run([sys.executable, "-m", "gradflow", "probe-backward", "tiny-phi3", "--gc", "sideways"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("gradflow: error: --gc 'sideways'")


@pytest.mark.slow
def test_shell_completion_script_and_choice_values(tmp_path):
    script = subprocess.run([sys.executable, "-m", "gradflow", "--show-completion", "bash"], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "_GRADFLOW_COMPLETE=complete_bash" in script.stdout
    env = child_env(_GRADFLOW_COMPLETE="complete_bash", COMP_WORDS="gradflow probe-backward tiny-phi3 --gc ",
                    COMP_CWORD="4")
    done = subprocess.run([sys.executable, "-m", "gradflow"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["off", "reentrant", "non-reentrant"]


# ----- on real setups, in-process ----------------------------------------------------------------------------
def test_select_and_ignore_filter_findings_and_exit_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    full = invoke("probe-backward", SEED_BUG, "--format", "json")
    assert (full.code, _codes(full)) == (1, ["GF101", "GF302"])
    ignored = invoke("probe-backward", SEED_BUG, "--format", "json", "--ignore", "reentrant-checkpoint-no-input-grad")
    assert (ignored.code, _codes(ignored)) == (0, ["GF302"])
    assert "1 finding(s) not shown, deselected by the command line" in ignored.stderr
    selected = invoke("probe-backward", SEED_BUG, "--format", "sarif", "--select", "GF3")
    assert selected.code == 0
    assert [r["ruleId"] for r in selected.json()["runs"][0]["results"]] == ["GF302"]
    only_errors = invoke("probe-backward", SEED_BUG, "--format", "json", "--select", "GF1", "--fail-on", "warning")
    assert (only_errors.code, _codes(only_errors)) == (1, ["GF101"])
    # patch: the before and after reports are filtered too; the fix is still applied
    patched = invoke("patch", SEED_BUG, "--format", "json", "--select", "GF3")
    data = patched.json()
    assert patched.code == 0 and data["fixes_applied"]
    assert [f["code"] for f in data["before"]["findings"]] == ["GF302"]
    assert all(f["code"].startswith("GF3") for f in data["findings"])


def test_pyproject_sets_the_defaults_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, '[tool.gradflow]\nignore = ["GF101"]\n')
    assert _codes(run := invoke("probe-backward", SEED_BUG, "--format", "json")) == ["GF302"] and run.code == 0
    assert "[tool.gradflow] in" in run.stderr
    assert invoke("probe-backward", SEED_BUG, "--isolated", "--format", "json").code == 1
    assert invoke("probe-backward", SEED_BUG, "--select", "ALL", "--format", "json").code == 1  # select resets
    _toml(tmp_path, '[tool.gradflow]\nfail-on = "never"\n')
    assert invoke("probe-backward", SEED_BUG, "--format", "json").code == 0
    assert invoke("probe-backward", SEED_BUG, "--format", "json", "--fail-on", "error").code == 1
    # trainable: the embeddings are meant to train but are frozen
    _toml(tmp_path, '[tool.gradflow]\ntrainable = "lora_|embed_tokens"\n')
    meant = invoke("inspect", "tiny-llama", "--static", "--format", "json")
    assert meant.code == 1 and "intended-param-frozen" in [f["slug"] for f in meant.json()["findings"]]
    assert invoke("inspect", "tiny-llama", "--static", "--trainable", "lora_", "--format", "json").code == 0


def test_baseline_written_then_compared_then_updated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ci" / "baseline.json"
    first = invoke("probe-backward", SEED_BUG, "--baseline", str(path), "--format", "json")
    assert first.code == 1  # missing: written, and the exit code follows --fail-on (GF101 is an error)
    assert first.json()["baseline"]["status"] == "written"
    saved = json.loads(path.read_text())
    assert saved["findings"] == [
        {"code": "GF101", "slug": "reentrant-checkpoint-no-input-grad", "location": "base_model.model.model.layers.0"},
        {"code": "GF302", "slug": "use-cache-in-training", "location": None}]
    assert saved["trainable"]["count"] == len(expand_names(saved["trainable"]["names"])) > 0
    assert len(saved["trainable"]["names"]) == 8 and all("layers.{0-3}." in n for n in saved["trainable"]["names"])
    assert sorted(os.listdir(path.parent)) == ["baseline.json"]  # no temporary file left behind

    same = invoke("probe-backward", SEED_BUG, "--baseline", str(path))
    assert same.code == 0 and "matches the baseline" in same.stderr  # the known error is accepted

    # a finding gone from the baseline is fixed: reported, never a failure (one only deselected is not gone:
    # tests/cli/test_baseline.py)
    healthy = ("probe-backward", SEED_BUG, "--baseline", str(path), "--gc", "non-reentrant")
    fixed = invoke(*healthy, "--format", "json")
    assert fixed.code == 0
    assert fixed.json()["baseline"]["findings"]["removed"] == [
        {"code": "GF101", "slug": "reentrant-checkpoint-no-input-grad", "location": "base_model.model.model.layers.0"}]
    assert "  - fixed GF101 reentrant-checkpoint-no-input-grad at base_model.model.model.layers.0" in \
        fixed.stderr.splitlines()
    assert "--update-baseline" in fixed.stderr  # the hint to record the new state

    updated = invoke(*healthy, "--fail-on", "warning", "--update-baseline")
    assert updated.code == 0 and "wrote the baseline" in updated.stderr  # rewritten; exit by --fail-on (info only)
    assert "matches the baseline" in invoke(*healthy).stderr


def test_baseline_sees_the_trainable_set_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("inspect", "tiny-llama", "--static", "--baseline", "b.json").code == 0
    fewer = invoke("inspect", "tiny-llama", "--static", "--baseline", "b.json", "--lora-targets", "q_proj,v_proj",
                   "--format", "json")
    assert fewer.code == 1
    change = fewer.json()["baseline"]["trainable"]
    assert change["added"] == [] and len(change["removed"]) == 10  # k, o, gate, up, down × lora_A/B
    assert all("{0-3}" in n and "q_proj" not in n and "v_proj" not in n for n in change["removed"])
    assert "  - trainable base_model.model.model.layers.{0-3}.mlp.down_proj.lora_A.default.weight" in \
        fewer.stderr.splitlines()


def test_a_broken_baseline_file_is_one_error(tmp_path):
    (tmp_path / "b.json").write_text('{"gradflow_baseline": 1, "findings": "x"}')
    assert_one_line_error(invoke_main("inspect", "tiny-llama", "--static", "--baseline", "b.json", cwd=tmp_path),
                          "--baseline b.json is not a gradflow baseline", "--update-baseline")


def test_quiet_gives_data_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loud = invoke("inspect", "tiny-llama", "--static", "--baseline", "a.json", "--ignore", "GF3")
    assert "wrote the baseline a.json" in loud.stderr
    quiet = invoke("inspect", "tiny-llama", "--static", "--baseline", "b.json", "--ignore", "GF3", "-q")
    assert quiet.code == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout
    assert_one_line_error(invoke_main("inspect", "tiny-llama", "-q", "--gc", "x", cwd=tmp_path), "--gc 'x'")


# ----- baseline file (library) -------------------------------------------------------------------------------
def test_compact_names_are_exact_and_short():
    names = [f"m.layers.{i}.attn.{p}.lora_{ab}.weight" for i in range(80) for p in "qkvo" for ab in "AB"]
    names += [f"m.layers.{i}.moe.experts.{e}.w1" for i in range(3) for e in range(8)]
    names += ["m.layers.5.extra", "m.layers.7.extra", "lm_head.weight"]
    short = compact_names(names)
    assert len(short) == 8 + 1 + 1 + 1 and "m.layers.{5,7}.extra" in short
    assert "m.layers.{0-2}.moe.experts.{0-7}.w1" in short
    assert expand_names(short) == set(names)
    rng = random.Random(0)
    for _ in range(100):
        points = {(rng.randrange(6), rng.randrange(6)) for _ in range(rng.randrange(1, 20))}
        sample = [f"a.{i}.b.{j}.c" for i, j in points]
        assert expand_names(compact_names(sample)) == set(sample)


def test_baseline_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    write_json_atomic(str(path), {"v": 1})

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(GradflowError, match="cannot write the baseline .*No space left on device"):
        write_json_atomic(str(path), {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["b.json"]


def test_the_repository_itself_has_no_tool_gradflow():
    # the test suite runs from the repository: a [tool.gradflow] there would change every CLI test
    import tomllib

    assert "gradflow" not in tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {})
