"""Factories behave like user code: prints go to stderr, sibling imports work, module-level objects work.

Through the console script's main(), in-process: the factory's prints are Python-level, redirected the same way."""

from __future__ import annotations

import json
import textwrap

from tests.helpers.cli import invoke_main

_HELPER = '''
import torch
from peft import LoraConfig, get_peft_model
from gradflow.setup.presets import build_preset

def lora_model():
    print("building the model")  # a chatty user helper
    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
'''

_FACTORY = '''
print("importing the factory")
import torch
from helper import lora_model  # a sibling module, as `python factory.py` would find it

MODEL = lora_model()
ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
SETUP = {"model": MODEL, "batch": {"input_ids": ids, "labels": ids}, "trainable": "lora_"}
NOT_A_SETUP = 3

class Loud(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = lora_model()

    def forward(self, **batch):
        print("forward says hi")  # prints inside the probed forward too
        return self.inner(**batch)

def build():
    print("build() runs")
    return {"model": Loud(), "batch": {"input_ids": ids, "labels": ids}}

def trainer():
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[5, 6, 7, 8]] * 4})
    args = TrainingArguments(output_dir=OUT, per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True)
    return {"trainer": Trainer(model=lora_model(), args=args, train_dataset=ds), "trainable": "lora_B"}
'''


def _write(tmp_path):
    (tmp_path / "helper.py").write_text(textwrap.dedent(_HELPER))
    out = tmp_path / "out"
    (tmp_path / "factory.py").write_text(f"OUT = {str(out)!r}\n" + textwrap.dedent(_FACTORY))
    return tmp_path / "factory.py", out


def test_printing_factory_keeps_json_and_sarif_valid(tmp_path):
    factory, _ = _write(tmp_path)
    run = invoke_main("probe-backward", f"{factory}:build", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)  # nothing but the report on stdout
    assert data["params"]["with_grad"] == data["params"]["trainable"] > 0
    for said in ("importing the factory", "building the model", "build() runs", "forward says hi"):
        assert said in run.stderr and said not in run.stdout
    run = invoke_main("probe-backward", f"{factory}:build", "--format", "sarif")
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["version"] == "2.1.0"


def test_module_level_model_and_dict(tmp_path):
    factory, _ = _write(tmp_path)
    run = invoke_main("inspect", f"{factory}:MODEL", "--static", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["model"]["peft"] is True
    run = invoke_main("probe-backward", f"{factory}:SETUP", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)
    assert data["params"]["trainable"] > 0 and not [f for f in data["findings"] if f["severity"] == "error"]
    run = invoke_main("probe-backward", f"{factory}:NOT_A_SETUP")
    assert run.code == 2 and run.stdout == "" and "Traceback" not in run.stderr
    # the factory's own prints come first (on stderr); gradflow's one line is the last
    assert run.stderr.splitlines()[-1].startswith("gradflow: error: ") and "NOT_A_SETUP is a int" in run.stderr


def test_trainer_factory_dict_with_trainable(tmp_path):
    factory, out = _write(tmp_path)
    run = invoke_main("probe-backward", f"{factory}:trainer", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)
    assert data["params"]["with_grad"] == data["params"]["trainable"] > 0
    assert not out.exists() or not any(out.iterdir())  # the probe wrote no log or checkpoint
    # a Trainer sets up its own model: setup flags would be ignored, so they are refused
    run = invoke_main("probe-backward", f"{factory}:trainer", "--gc", "reentrant")
    assert run.code == 2 and run.stdout == "" and "Traceback" not in run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("gradflow: error: ") and "returns a Trainer" in last and "--gc" in last
