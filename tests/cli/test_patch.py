"""`gradflow patch` end to end: the console script's main(), its before/after table, its snippet pasted into a plain
script (run in a fresh interpreter), --dry-run, --save, --format json, --fail-on and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.cli import assert_one_line_error, invoke, invoke_main
from tests.helpers.env import child_env

SEED_BUG = "gradflow.demos:seed_bug"

# The seed's broken setup written as a user writes it: plain transformers + PEFT, no gradflow.
BROKEN_SCRIPT = textwrap.dedent('''
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()  # transformers 5 adds the hook here; 4.57 never did in this order
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
''')

TRAIN_TAIL = textwrap.dedent('''
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    start = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    moved = [n for n, p in lora.items() if not torch.equal(start[n], p.detach())]
    assert len(lora) == 32 and len(moved) == len(lora), (len(moved), len(lora))
    assert losses[-1] < losses[0], losses
    print("TRAINED", len(moved), losses[0], losses[-1])
''')


def snippet_of(stdout: str) -> str:
    """The lines between the snippet's two marker lines, as printed."""
    from gradflow.report.render.patch import SNIPPET_END, SNIPPET_START

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SNIPPET_START))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(SNIPPET_END))
    return "\n".join(lines[start + 1:end]) + "\n"


def table(stdout: str) -> dict[str, list[str]]:
    """The before/after table: row label -> [before, after]."""
    import re

    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["before", "after"])
    rows = {}
    for line in lines[head + 2:head + 5]:  # the header, its rule, then three rows
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def seed_bug_run():
    return invoke_main("patch", SEED_BUG)


def test_patch_seed_bug_shows_before_after_the_proof_and_the_snippet(seed_bug_run):
    run = seed_bug_run
    assert run.code == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    out = run.stdout
    assert "reentrant-checkpoint-no-input-grad" in out.split("fixes applied")[0]  # found before
    rows = table(out)
    assert rows["params with gradients"] == ["0 / 32", "32 / 32"], rows
    assert rows["findings"] == ["1 error, 1 info", "1 info"], rows
    assert rows["loss grad_fn"][0] == "none" and rows["loss grad_fn"][1].endswith("Backward0"), rows
    assert "✓ input-grad-hook (safe)" in out and "why:" in out
    assert "proof: every intended trainable parameter (32) receives a finite gradient" in out
    assert "enable_input_require_grads()" in snippet_of(out)


def _run_script(tmp_path, code: str):
    path = tmp_path / "train_script.py"
    path.write_text(code)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=child_env())


@pytest.mark.slow
def test_printed_snippet_makes_a_plain_script_train(seed_bug_run, tmp_path):
    broken = _run_script(tmp_path, BROKEN_SCRIPT + TRAIN_TAIL)
    assert broken.returncode != 0 and "does not require grad" in broken.stderr  # the seed's failure
    fixed = _run_script(tmp_path, BROKEN_SCRIPT + snippet_of(seed_bug_run.stdout) + TRAIN_TAIL)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "TRAINED 32" in fixed.stdout


def test_dry_run_json_shows_the_plan_and_keeps_the_error():
    run = invoke("patch", SEED_BUG, "--plan-only", "--format", "json")
    assert run.code == 1, run.stdout[-2000:]
    data = json.loads(run.stdout)
    assert data["command"] == "patch" and data["after"] is None and data["fixes_applied"] == []
    assert [p["id"] for p in data["plan"]] == ["input-grad-hook", "cache-off"]
    assert data["before"]["params"]["none_grad"] == 32
    assert "reentrant-checkpoint-no-input-grad" in [f["slug"] for f in data["findings"]]


def test_dry_run_text_says_nothing_changed():
    run = invoke("patch", SEED_BUG, "--dry-run")  # the old name of --plan-only still works
    assert run.code == 1
    assert "dry run: nothing was changed" in run.stdout
    assert "after (dry run: not patched)" in run.stdout


def test_json_has_before_after_and_fixes():
    run = invoke("patch", SEED_BUG, "--format", "json")
    assert run.code == 0
    data = json.loads(run.stdout)
    assert data["before"]["loss"]["grad_fn"] is None and data["after"]["loss"]["grad_fn"]
    assert [f["id"] for f in data["fixes_applied"]] == ["input-grad-hook", "cache-off"]
    assert all(f["verified"] for f in data["fixes_applied"])
    assert "enable_input_require_grads" in data["snippet"]


def test_save_writes_adapter_and_recipe_that_reload(tmp_path):
    from gradflow.fixes.recipe_file import load_recipe

    out = tmp_path / "patched"
    run = invoke("patch", "tiny-phi3", "--gc", "reentrant", "--save", str(out), "--format", "json")
    assert run.code == 0, run.stdout[-2000:]
    data = json.loads(run.stdout)
    assert {"adapter_config.json", "adapter_model.safetensors", "gradflow_recipe.json"} <= set(data["saved"]["files"])
    recipe = load_recipe(str(out))
    assert [f["id"] for f in recipe.fixes] == [f["id"] for f in data["fixes_applied"]]
    # the saved adapter names the preset as its base, so gradflow can load the directory again
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-phi3"
    # loaded by name, the adapter comes back frozen (is_trainable=False): patch unfreezes it
    again = invoke("patch", str(out), "--format", "json")
    assert again.code == 0, again.stdout[-2000:]
    assert [f["id"] for f in json.loads(again.stdout)["fixes_applied"]] == ["unfreeze-adapter"]


def _graph_break_factory(tmp_path) -> str:
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from peft import LoraConfig, get_peft_model
        from gradflow.setup.presets import build_preset

        class Detach(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x).detach()

        def make():
            model = get_peft_model(build_preset("tiny-llama"), LoraConfig(r=4, target_modules="all-linear",
                                                                          task_type="CAUSAL_LM"))
            layers = model.get_base_model().model.layers
            layers[1].mlp = Detach(layers[1].mlp)
            return model
    '''))
    return f"{path}:make"


def test_a_remaining_error_exits_1_unless_fail_on_never(tmp_path):
    factory = _graph_break_factory(tmp_path)
    run = invoke("patch", factory)
    assert run.code == 1
    assert "graph-break" in run.stdout and "to fix in your code (display-only)" in run.stdout
    assert "factory.py:" in run.stdout  # the line to edit
    assert invoke("patch", factory, "--fail-on", "never").code == 0


def test_save_with_dry_run_is_a_usage_error(tmp_path):
    assert_one_line_error(invoke("patch", SEED_BUG, "--dry-run", "--save", str(tmp_path / "x")),
                          "--save", "--dry-run")


def test_save_onto_a_file_is_a_usage_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert_one_line_error(invoke("patch", SEED_BUG, "--save", str(target)), "is a file")


def test_save_of_a_plain_module_is_a_usage_error(tmp_path):
    factory = tmp_path / "plain.py"
    factory.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    run = invoke("patch", f"{factory}:make", "--save", str(tmp_path / "out"))
    assert run.code == 2 and run.stdout == ""


def test_bad_format_is_a_usage_error():
    assert_one_line_error(invoke_main("patch", SEED_BUG, "--format", "sarif"), "--format")  # through main()


def test_help_lists_patch_options():
    run = invoke("patch", "--help")
    assert run.code == 0
    for option in ("--unsafe-fixes", "--plan-only", "--save", "--format", "--fail-on", "--trainable", "--gc"):
        assert option in run.stdout, option


def test_unsafe_fixes_only_with_the_flag(tmp_path):
    path = tmp_path / "workaround.py"
    path.write_text(textwrap.dedent('''
        from gradflow.demos import seed_bug

        def make():
            setup = seed_bug()
            setup["model"].get_input_embeddings().weight.requires_grad_(True)  # the seed's costly workaround
            return setup
    '''))
    safe = invoke("patch", f"{path}:make", "--fail-on", "warning")
    assert safe.code == 1  # the costly embeddings remain a warning
    assert "unsafe fixes not applied (run with --unsafe-fixes)" in safe.stdout and "refreeze-embeddings" in safe.stdout
    unsafe = invoke("patch", f"{path}:make", "--unsafe-fixes", "--fail-on", "warning", "--format", "json")
    assert unsafe.code == 0, unsafe.stdout[-2000:]
    data = json.loads(unsafe.stdout)
    assert {"refreeze-embeddings", "input-grad-hook"} <= {f["id"] for f in data["fixes_applied"]}
    assert data["after"]["params"]["trainable"] == 32 and data["verification"]["ok"]
