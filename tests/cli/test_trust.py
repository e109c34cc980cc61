"""The trust rule and the CI gate, through the console script's main() (in-process; a training run in a real one).

Only a MODEL the user typed may import Python. A base model named in a file (an adapter config, a run's
gradflow_train.json) resolves as a preset, directory or hub id; a factory there runs only with
--trust-remote-code. A factory cannot end gradflow with a clean exit: SystemExit and KeyboardInterrupt from user
code are exit 2 with one line naming the factory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, gradflow, invoke_main

# writes a marker at import: the marker existing means gradflow ran this file
EVIL = '''
import pathlib

pathlib.Path(__file__).with_name("MARKER").write_text("imported")


def build():
    from gradflow.setup.presets import build_preset

    return build_preset("tiny-gpt2")
'''

FACTORIES = '''
import sys

import torch


def exits_zero():
    raise SystemExit(0)


def interrupts():
    raise KeyboardInterrupt


def exits_in_loss():
    from gradflow.setup.presets import build_preset

    def loss_fn(model, batch):
        sys.exit(0)

    return {"model": build_preset("tiny-gpt2"), "batch": {"input_ids": torch.zeros(1, 4, dtype=torch.long)},
            "loss_fn": loss_fn}


def exits_in_train():
    from gradflow.setup.presets import build_preset, build_tokenizer

    return {"model": build_preset("tiny-gpt2"), "tokenizer": build_tokenizer(),
            "loss_fn": lambda model, batch: sys.exit(0)}
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """evil.py, an adapter dir (a real tiny-gpt2 LoRA save) whose config and run metadata name evil.py:build."""
    from gradflow.setup.presets import build_preset
    from gradflow.setup.build import apply_lora

    d = tmp_path_factory.mktemp("trust")
    (d / "evil.py").write_text(EVIL)
    (d / "factories.py").write_text(FACTORIES)
    (d / "data.jsonl").write_text(json.dumps({"text": "a fine sample"}) + "\n")
    (d / "import_exits.py").write_text("raise SystemExit(0)\n\n\ndef build():\n    return None\n")
    adapter = d / "adapter"
    apply_lora(build_preset("tiny-gpt2"), 2, 4, "all-linear").save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "evil.py:build"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "gradflow_train.json").write_text(json.dumps({"base": "evil.py:build", "base_seed": 0}))
    return d


def _marker(work: Path) -> Path:
    return work / "MARKER"


def test_adapter_config_base_factory_is_refused_then_trusted(work):
    _marker(work).unlink(missing_ok=True)
    line = assert_one_line_error(invoke_main("inspect", "adapter", "--static", cwd=work),
                                 "adapter_config.json (base_model_name_or_path) names the Python factory "
                                 "'evil.py:build'", "--trust-remote-code")
    assert "preset, model directory or hub id" in line
    assert not _marker(work).exists()

    run = invoke_main("inspect", "adapter", "--static", "--trust-remote-code", "--format", "json", "--fail-on",
                      "never", cwd=work)
    assert run.code == 0, run.stderr
    assert _marker(work).exists()
    assert "lora_A" in run.stdout  # the adapter loaded onto the factory's base


def test_merge_run_metadata_base_factory_is_refused_then_trusted(work):
    _marker(work).unlink(missing_ok=True)
    shutil.rmtree(work / "merged", ignore_errors=True)
    assert_one_line_error(invoke_main("merge", "adapter", "--output", "merged", cwd=work),
                          "gradflow_train.json (base) names the Python factory 'evil.py:build'", "--trust-remote-code")
    assert not _marker(work).exists() and not (work / "merged").exists()

    run = invoke_main("merge", "adapter", "--output", "merged", "--trust-remote-code", cwd=work)
    assert run.code == 0, run.stderr
    assert _marker(work).exists()
    assert (work / "merged" / "config.json").is_file()


def test_a_base_read_from_a_file_resolves_only_as_preset_directory_or_hub_id(work, monkeypatch):
    """In process: every form of code in a file-read spec is refused; presets, directories and hub ids are not."""
    from gradflow.errors import GradflowError
    from gradflow.setup.sources import resolve

    monkeypatch.chdir(work)
    for spec in ("evil.py:build", "evil:build", "gradflow.demos:seed_bug", "evil.py", str(work / "evil.py") + ":build"):
        with pytest.raises(GradflowError, match="names the Python factory"):
            resolve(spec, named_in="cfg.json (base)")
    assert resolve("tiny-gpt2", named_in="cfg.json (base)").kind == "preset"
    assert resolve("adapter", named_in="cfg.json (base)").kind == "dir"
    assert resolve("some-org/some-model", named_in="cfg.json (base)").kind == "hub"
    assert not _marker(work).exists() or _marker(work).read_text() == "imported"  # from the trusted runs only


def test_recipe_files_name_no_code_to_run(work, tmp_path):
    """`train --recipe` reads fixes as data: a recipe whose `source` is a factory imports nothing."""
    from gradflow.fixes.recipe_file import RECIPE_KIND, RECIPE_SCHEMA, load_recipe

    _marker(work).unlink(missing_ok=True)
    path = tmp_path / "gradflow_recipe.json"
    path.write_text(json.dumps({"kind": RECIPE_KIND, "schema_version": RECIPE_SCHEMA, "fixes": [],
                                "source": str(work / "evil.py") + ":build"}))
    assert load_recipe(str(path)).fixes == []
    assert not _marker(work).exists()


EXITS = {
    "exit-zero-at-call": ["probe-backward", "factories.py:exits_zero", "--fail-on", "warning"],
    "sys-exit": ["probe-backward", "sys:exit"],
    "keyboard-interrupt": ["inspect", "factories.py:interrupts"],
    "exit-at-import": ["probe-backward", "import_exits.py:build", "--fail-on", "warning"],
    "exit-in-loss": ["probe-backward", "factories.py:exits_in_loss", "--fail-on", "warning"],
}


@pytest.mark.parametrize("case,needles", [
    ("exit-zero-at-call", ["factory factories.py:exits_zero raised SystemExit(0) while building the model",
                           "factories.py:", "not exit"]),
    ("sys-exit", ["factory sys:exit raised SystemExit(None) while building the model"]),
    ("keyboard-interrupt", ["factory factories.py:interrupts was interrupted (KeyboardInterrupt) while building"]),
    ("exit-at-import", ["factory import_exits.py:build raised SystemExit(0) while importing import_exits.py",
                        "import_exits.py:1"]),
    ("exit-in-loss", ["factory factories.py:exits_in_loss raised SystemExit(0) while running its forward, loss",
                      "factories.py:"]),
])
def test_user_code_cannot_exit_cleanly(work, case, needles):
    assert_one_line_error(invoke_main(*EXITS[case], cwd=work), *needles)  # exit 2, never 0 (or 130), one line


@pytest.mark.slow
def test_user_code_cannot_exit_cleanly_from_a_training_run(work):
    # a real process: the exit comes from the loss inside Trainer.train()
    run = gradflow("train", "factories.py:exits_in_train", "--data", "data.jsonl", "--output", "run", "--max-steps",
                   "1", cwd=work)
    # train's progress lines come first on stderr; the error is the last line
    assert run.code == 2 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("gradflow: error: code outside gradflow raised SystemExit(0) (at factories.py:"), last
    assert "Remove that exit call" in last


class _RunsCode:
    """A pickle that would run a command when unpickled without torch's weights-only guard."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickled_adapter_file_is_refused_in_one_line_and_runs_nothing(tmp_path):
    """--adapter DIR whose adapter_model.bin is a pickled object: torch's weights-only loader refuses it, and that
    is one line, exit 2, where it was an internal error; the pickle's command never runs (issue 21)."""
    import pickle

    from gradflow.setup.build import apply_lora
    from gradflow.setup.presets import build_preset

    adapter = tmp_path / "adapter"
    apply_lora(build_preset("tiny-llama"), 2, 4, "all-linear").save_pretrained(str(adapter))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "RAN"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    line = assert_one_line_error(invoke_main("probe-backward", "tiny-llama", "--adapter", str(adapter)),
                                 f"{adapter} holds an adapter file that is not plain tensors",
                                 "Save the adapter again with save_pretrained")
    assert "internal error" not in line and not marker.exists()
