"""Bad input through the CLI's main(): exit 2, one actionable line on stderr, no traceback, nothing on stdout.

In-process (tests.helpers.cli.invoke_main); the installed console script gives the same line in a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, gradflow, invoke_main
from tests.helpers.env import child_env

FACTORIES = '''
def raises():
    raise ValueError("boom: the config is missing\\nsecond line of detail")


def returns_int():
    return 42


def dict_without_model():
    import torch

    return {"batch": {"input_ids": torch.zeros(1, 4, dtype=torch.long)}}


def dict_unknown_key():
    import torch

    return {"model": torch.nn.Linear(4, 4), "lr": 1e-4}


def dict_bad_regex():
    import torch

    return {"model": torch.nn.Linear(4, 4), "trainable": "lora_(["}


def plain_module():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def peft_model():
    from peft import LoraConfig, get_peft_model

    from gradflow.setup.presets import build_preset

    return get_peft_model(build_preset("tiny-llama"), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))


NOT_CALLABLE = {"model": None}
'''

GOOD_LINE = json.dumps({"text": "a fine sample"})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory holding every broken file the cases below point at."""
    d = tmp_path_factory.mktemp("bad_input")
    (d / "factories.py").write_text(FACTORIES)
    (d / "syntax_error.py").write_text("def build(:\n    return None\n")
    (d / "import_error.py").write_text("import no_such_module_xyz  # noqa\n\n\ndef build():\n    return None\n")
    (d / "bad.jsonl").write_text(GOOD_LINE + "\n" + '{"text": "unterminated\n' + GOOD_LINE + "\n")
    (d / "no_fields.jsonl").write_text(GOOD_LINE + "\n\n" + json.dumps({"body": "x"}) + "\n")
    (d / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (d / "bad_role.jsonl").write_text(json.dumps({"messages": [{"role": "<think-task>CANARY", "content": "hi"}]})
                                      + "\n")
    (d / "deep.jsonl").write_text(GOOD_LINE + "\n" + '{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    (d / "huge_int.jsonl").write_text(GOOD_LINE + "\n" + '{"text": "x", "id": ' + "9" * 5000 + "}\n")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n\n")
    (d / "good.jsonl").write_text(GOOD_LINE + "\n")
    (d / "datadir").mkdir()
    (d / "emptydir").mkdir()
    (d / "not_an_adapter").mkdir()
    (d / "not_an_adapter" / "config.json").write_text("{}")
    (d / "broken_config").mkdir()
    (d / "broken_config" / "config.json").write_text("{not json")
    (d / "notes.txt").write_text("not a model")
    return d


# `gradflow train` up to its option checks: the output directory is never made when an option is refused
TRAIN = ["train", "tiny-gpt2", "--data", "good.jsonl", "--output", "never_made"]

# (id, argv, substrings the one stderr line must hold)
CASES = [
    # MODEL: paths, presets, hub ids
    ("missing-relative-path", ["inspect", "./no/such/dir"], ["no such directory: ./no/such/dir"]),
    ("missing-absolute-path", ["probe-backward", "/nonexistent/model/dir"], ["no such directory"]),
    ("unknown-preset", ["inspect", "tiny-bogus"], ["unknown preset 'tiny-bogus'", "tiny-phi3"]),
    ("file-not-model", ["inspect", "notes.txt"], ["notes.txt is a file", "FILE.py:FUNCTION"]),
    ("empty-directory", ["probe-backward", "emptydir"], ["emptydir has no config.json", "save_pretrained"]),
    ("broken-config-json", ["inspect", "broken_config"], ["could not load broken_config", "save_pretrained"]),
    ("hub-id-unreachable", ["probe-backward", "no-such-org/no-such-model"],
     ["could not load no-such-org/no-such-model", "network"]),
    # factories
    ("factory-file-missing", ["inspect", "missing.py:build"], ["factory file not found: missing.py"]),
    ("factory-syntax-error", ["inspect", "syntax_error.py:build"], ["syntax_error.py failed to import", "SyntaxError"]),
    ("factory-import-error", ["probe-backward", "import_error.py:build"],
     ["ModuleNotFoundError", "no_such_module_xyz", "import_error.py:1"]),
    ("factory-module-missing", ["inspect", "no_such_pkg.models:build"], ["cannot import module 'no_such_pkg.models'"]),
    ("factory-function-missing", ["inspect", "factories.py:nope"], ["has no function or object 'nope'"]),
    ("factory-not-callable", ["inspect", "factories.py:NOT_CALLABLE"], ["whose 'model' is NoneType, not an nn.Module"]),
    ("factory-raises", ["probe-backward", "factories.py:raises"],
     ["factories.py:raises raised ValueError: boom: the config is missing", "factories.py:3"]),
    ("factory-returns-non-module", ["inspect", "factories.py:returns_int"], ["returned int, not an nn.Module, Trainer or dict"]),
    ("factory-dict-without-model", ["probe-backward", "factories.py:dict_without_model"],
     ["'model' is NoneType, not an nn.Module"]),
    ("factory-dict-unknown-key", ["inspect", "factories.py:dict_unknown_key"], ["unknown keys: lr"]),
    ("factory-dict-bad-regex", ["inspect", "factories.py:dict_bad_regex"], ["'trainable' is not a valid regular expression"]),
    ("factory-with-quant", ["probe-backward", "factories.py:plain_module", "--quant", "4bit"],
     ["--quant 4bit needs gradflow to load the model", "Quantize inside the factory"]),
    ("factory-gc-not-transformers", ["probe-backward", "factories.py:plain_module", "--gc", "reentrant"],
     ["--gc reentrant: Sequential is not a transformers model"]),
    ("factory-no-batch-no-vocab", ["probe-backward", "factories.py:plain_module"],
     ["gave a Sequential without a batch", "Return {'model': ..., 'batch': ...}"]),
    ("factory-lora-alpha-without-rank", ["probe-backward", "factories.py:plain_module", "--lora-alpha", "4"],
     ["--lora-alpha has no effect", "--lora-r 8"]),
    ("factory-peft-lora-again", ["probe-backward", "factories.py:peft_model", "--lora-r", "4"],
     ["already gives a PeftModelForCausalLM with adapters, so --lora-r would wrap it in a second one"]),
    # impossible option values
    ("trainable-bad-regex", ["inspect", "tiny-phi3", "--trainable", "lora_(["], ["--trainable is not a valid regular expression"]),
    ("trainable-matches-nothing", ["probe-backward", "tiny-phi3", "--trainable", "zzz_no_such_param"],
     ["--trainable 'zzz_no_such_param' matches no parameter", "parameter names look like"]),
    ("gc-sideways", ["probe-backward", "tiny-phi3", "--gc", "sideways"], ["--gc 'sideways' is not one of off, reentrant"]),
    ("quant-3bit", ["probe-backward", "tiny-phi3", "--quant", "3bit"], ["--quant '3bit' is not one of none, 4bit, 8bit"]),
    ("dtype-float8", ["inspect", "tiny-phi3", "--dtype", "float8"], ["--dtype 'float8' is not a known dtype", "bfloat16"]),
    ("format-sarif-inspect", ["inspect", "tiny-phi3", "--format", "sarif"], ["--format 'sarif' is not one of text, json"]),
    ("format-xml-probe", ["probe-backward", "tiny-phi3", "--format", "xml"], ["--format 'xml' is not one of text, json, sarif"]),
    ("fail-on-maybe", ["probe-backward", "tiny-phi3", "--fail-on", "maybe"], ["--fail-on 'maybe' is not error, warning or never"]),
    ("batch-size-zero", ["probe-backward", "tiny-phi3", "--batch-size", "0"], ["--batch-size must be a positive integer"]),
    ("seq-len-negative", ["inspect", "tiny-phi3", "--seq-len", "-3"], ["--seq-len must be a positive integer up to 1048576, got -3"]),
    ("lora-r-negative", ["probe-backward", "tiny-phi3", "--lora-r", "-1"], ["--lora-r must be an integer from 0 (no LoRA) to 4096, got -1"]),
    ("lora-alpha-zero", ["probe-backward", "tiny-phi3", "--lora-alpha", "0"], ["--lora-alpha must be a positive integer up to 65536, got 0"]),
    ("depth-zero", ["inspect", "tiny-phi3", "--depth", "0"], ["--depth must be a positive integer up to 1000000, got 0"]),
    ("device-tpu", ["probe-backward", "tiny-phi3", "--device", "tpu"], ["--device 'tpu' is not auto, cpu or cuda"]),
    ("lora-targets-unknown", ["probe-backward", "tiny-phi3", "--lora-targets", "q_proj,v_proj"],
     ["--lora-targets", "q_proj", "no such linear module in Phi3ForCausalLM", "qkv_proj"]),
    ("lora-targets-with-rank-0", ["inspect", "tiny-phi3", "--lora-r", "0", "--lora-targets", "qkv_proj"],
     ["--lora-targets has no effect with --lora-r 0"]),
    ("adapter-trainable-without-adapter", ["probe-backward", "tiny-phi3", "--adapter-trainable"],
     ["--adapter-trainable has no adapter", "--adapter DIR"]),
    ("adapter-with-lora-rank", ["probe-backward", "tiny-phi3", "--adapter", "not_an_adapter", "--lora-r", "4"],
     ["--adapter loads an existing adapter"]),
    ("seq-len-beyond-positions", ["probe-backward", "tiny-gpt2", "--seq-len", "513"],
     ["--seq-len 513 is longer than the model's 512 learned positions", "--seq-len 512 or less"]),
    ("adapter-without-config", ["probe-backward", "tiny-phi3", "--adapter", "not_an_adapter"],
     ["--adapter not_an_adapter holds no adapter_config.json"]),
    ("adapter-missing-dir", ["probe-backward", "tiny-phi3", "--adapter", "no_such_adapter"],
     ["--adapter no_such_adapter: no such directory"]),
    # numbers: finite and bounded, the bound in the message (train's checks run before any data or model loads)
    ("lr-inf", [*TRAIN, "--lr", "inf"], ["--lr must be a finite number above 0 and at most 10, got inf", "--lr 2e-4"]),
    ("lr-nan", [*TRAIN, "--lr", "nan"], ["--lr must be a finite number above 0 and at most 10, got nan"]),
    ("lr-huge", [*TRAIN, "--lr", "1e9"], ["--lr must be a finite number above 0 and at most 10, got 1000000000.0"]),
    ("epochs-inf", [*TRAIN, "--epochs", "inf"], ["--epochs must be a finite number above 0 and at most 1e+06, got inf"]),
    ("max-steps-huge", [*TRAIN, "--max-steps", str(10**23)],
     ["--max-steps must be a positive integer up to 1000000000, got 100000000000000000000000"]),
    ("moved-at-zero", [*TRAIN, "--moved-at", "0"], ["--moved-at must be a positive integer up to 1000000000, got 0"]),
    ("moved-at-negative", [*TRAIN, "--moved-at", "-1"], ["--moved-at must be a positive integer", "got -1"]),
    ("seed-negative", ["probe-backward", "tiny-phi3", "--seed", "-1"],
     ["--seed must be an integer from 0 to 4294967295, got -1", "--seed 0"]),
    ("seed-huge", [*TRAIN, "--seed", str(2**32)], ["--seed must be an integer from 0 to 4294967295, got 4294967296"]),
    ("lora-r-huge", ["probe-backward", "tiny-phi3", "--lora-r", "100000"],
     ["--lora-r must be an integer from 0 (no LoRA) to 4096, got 100000"]),
    ("lora-r-above-hidden-size", ["inspect", "tiny-phi3", "--static", "--lora-r", "128"],
     ["--lora-r 128 is larger than the model's hidden size (64, from its config)", "--lora-r 64 or less"]),
    ("batch-size-huge", ["probe-backward", "tiny-phi3", "--batch-size", "1000000"],
     ["--batch-size must be a positive integer up to 65536, got 1000000"]),
    ("seq-len-huge", ["inspect", "tiny-phi3", "--seq-len", str(2**21)],
     ["--seq-len must be a positive integer up to 1048576, got 2097152"]),
    ("train-seq-len-beyond-positions", ["train", "tiny-gpt2", "--data", "good.jsonl", "--output", "run_seq",
                                        "--seq-len", "2048"],
     ["--seq-len 2048 is longer than the model's 512 learned positions", "--seq-len 512 or less"]),
    # --data
    ("data-malformed-json", ["probe-backward", "tiny-phi3", "--data", "bad.jsonl"], ["bad.jsonl:2: not valid JSON"]),
    ("data-no-fields", ["probe-backward", "tiny-phi3", "--data", "no_fields.jsonl"],
     ["no_fields.jsonl:3: needs 'text', 'prompt'/'completion', or 'messages'"]),
    ("data-no-assistant", ["inspect", "tiny-phi3", "--data", "no_assistant.jsonl"], ["no_assistant.jsonl:1: no assistant"]),
    ("data-unknown-role", ["probe-backward", "tiny-phi3", "--data", "bad_role.jsonl"],
     ["bad_role.jsonl:1: messages[0] has an unknown role (use system, user, assistant, tool)"]),
    ("data-nested-5000-deep", ["probe-backward", "tiny-phi3", "--data", "deep.jsonl"],
     ["malformed sample at deep.jsonl:2: nested deeper than 64 levels"]),
    ("data-5000-digit-int", ["probe-backward", "tiny-phi3", "--data", "huge_int.jsonl"],
     ["malformed sample at huge_int.jsonl:2: holds an integer longer than 30 digits"]),
    ("data-empty-file", ["probe-backward", "tiny-phi3", "--data", "empty.jsonl"], ["data file empty.jsonl is empty"]),
    ("data-blank-lines", ["probe-backward", "tiny-phi3", "--data", "blank.jsonl"], ["data file blank.jsonl is empty"]),
    ("data-directory", ["probe-backward", "tiny-phi3", "--data", "datadir"], ["--data datadir is a directory"]),
    ("data-missing", ["probe-backward", "tiny-phi3", "--data", "nope.jsonl"], ["data file not found: nope.jsonl"]),
    ("data-without-tokenizer", ["probe-backward", "factories.py:plain_module", "--data", "good.jsonl"],
     ["--data needs a tokenizer"]),
    # explain
    ("explain-unknown-code", ["explain", "GF999"], ["unknown finding 'GF999'", "gradflow explain"]),
    ("explain-unknown-slug", ["explain", "gradient-vanished"], ["unknown finding 'gradient-vanished'"]),
    ("explain-format-xml", ["explain", "GF101", "--format", "xml"], ["--format 'xml' is not text or json"]),
    # Click's own usage errors, as one line
    ("usage-unknown-option", ["probe-backward", "tiny-phi3", "--bogus"], ["No such option: --bogus", "gradflow probe-backward --help"]),
    ("usage-missing-argument", ["probe-backward"], ["Missing argument 'MODEL'", "gradflow probe-backward --help"]),
    ("usage-unknown-command", ["frobnicate"], ["No such command 'frobnicate'", "gradflow --help"]),
    ("usage-not-an-int", ["inspect", "tiny-phi3", "--batch-size", "two"], ["Invalid value for '--batch-size'"]),
    ("usage-extra-argument", ["explain", "GF101", "GF102"], ["unexpected extra argument", "gradflow explain --help"]),
]


@pytest.fixture(scope="module")
def outcomes(work):
    """`outcomes(case_id)`: that case's run through main(), in-process in `work`, once per module."""
    argvs = {case_id: argv for case_id, argv, _ in CASES}
    done = {}

    def get(case_id):
        if case_id not in done:
            done[case_id] = invoke_main(*argvs[case_id], cwd=work)
        return done[case_id]

    return get


@pytest.mark.parametrize("case_id,needles", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_actionable_line(outcomes, case_id, needles):
    line = assert_one_line_error(outcomes(case_id), *needles)
    # actionable: what is wrong, then a sentence saying what to do
    assert re.search(r"\. [A-Z][a-z]", line), line
    assert "CANARY" not in line  # a bad line's message names the field, never quotes its value


def test_refused_train_options_make_no_output(outcomes, work):
    for case_id, argv, _ in CASES:
        if argv[:len(TRAIN)] == TRAIN:
            assert outcomes(case_id).code == 2
    assert not (work / "never_made").exists() and not (work / "run_seq").exists()


def test_device_cuda_without_gpu(work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(invoke_main("probe-backward", "tiny-phi3", "--device", "cuda", cwd=work),
                          "--device cuda was asked for, but no CUDA GPU is visible", "--device cpu")


def test_case_ids_cover_every_category():
    ids = {c[0] for c in CASES}
    assert len(ids) == len(CASES) >= 20


def test_debug_variable_shows_the_traceback(work):
    run = invoke_main("probe-backward", "factories.py:raises", cwd=work, env={"GRADFLOW_DEBUG": "1"})
    assert run.code == 2
    assert run.stdout == ""
    assert "Traceback (most recent call last)" in run.stderr
    assert 'raise ValueError("boom' in run.stderr  # the user's own frame is in it
    assert run.stderr.splitlines()[-1].startswith("gradflow: error: factory factories.py:raises raised ValueError")


def test_debug_variable_shows_usage_error_tracebacks_too(work):
    run = invoke_main("inspect", "tiny-phi3", "--bogus", cwd=work, env={"GRADFLOW_DEBUG": "1"})
    assert run.code == 2 and "Traceback" in run.stderr
    assert run.stderr.splitlines()[-1].startswith("gradflow: error: No such option: --bogus")


@pytest.mark.slow
def test_console_script_gives_the_same_line(work):
    script = Path(sys.executable).with_name("gradflow")
    if not script.exists():
        pytest.skip("the gradflow console script is not installed beside this interpreter")
    proc = subprocess.run([str(script), "inspect", "tiny-bogus"], cwd=work, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [gradflow("inspect", "tiny-bogus", cwd=work).stderr.strip()]


def test_bare_gradflow_prints_help_and_exits_2(work):
    run = invoke_main(cwd=work)
    assert run.code == 2
    assert "probe-backward" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
