"""--check-gc and --steps as users meet them: a Trainer script (tests/realistic/lora_gc_non_reentrant.py), its own
checkpointing, optimizer and scheduler."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gradflow

SCRIPT = Path(__file__).parent / "realistic" / "lora_gc_non_reentrant.py"


def test_check_gc_and_steps_use_the_trainers_setup(tmp_path):
    spec = importlib.util.spec_from_file_location("_lora_gc_non_reentrant", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.build(str(tmp_path))
    report = gradflow.probe(trainer, check_gc=True, steps=2)
    data = report.to_dict()
    assert data["gc_check"]["compared"] is True and data["gc_check"]["mode"] == "non-reentrant"
    assert data["gc_check"]["diffs"] == []
    steps = data["steps"]
    assert (steps["optimizer_source"], steps["scheduler"]) == ("trainer", "LambdaLR")
    assert steps["lrs"][0][0] == trainer.args.learning_rate and steps["lrs"][1][0] < steps["lrs"][0][0]
    assert not {"checkpoint-changes-gradients", "param-not-updated", "zero-learning-rate"} & set(report.slugs())
