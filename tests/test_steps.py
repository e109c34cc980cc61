"""--steps K end to end: parameters, optimizer and scheduler state put back exactly; a Trainer's optimizer; the CLI."""

from __future__ import annotations

import copy

import torch
from torch.optim.lr_scheduler import LambdaLR

import gradflow
from tests.helpers.builders import batch, lora, tiny_batch, tiny_lm
from tests.helpers.cli import invoke


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_parameters_optimizer_and_scheduler_state_restored():
    """An optimizer mid-run (its AdamW moments non-empty) and a scheduler mid-schedule come back bit-identical."""
    model = tiny_lm(freeze=False)
    data = tiny_batch()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)
    sched = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(2):  # the user's own steps before the probe
        model(**data)["loss"].backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    sched_state = copy.deepcopy(sched.state_dict())
    rng = torch.get_rng_state()

    report = gradflow.probe(model, data, optimizer=optimizer, lr_scheduler=sched, steps=3)
    run = report.snapshot.steps
    assert run.restored and run.error is None and len(run.lrs) == 3
    assert all(p.changed for p in run.params)  # the steps did move them...
    for n, p in model.named_parameters():  # ...and they are back
        torch.testing.assert_close(p.detach(), params[n], rtol=0, atol=0)
    torch.testing.assert_close(optimizer.state_dict(), opt_state, rtol=0, atol=0)
    assert sched.state_dict() == sched_state and optimizer.param_groups[0]["lr"] == opt_state["param_groups"][0]["lr"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    # the next real step is the one it would have been without the probe
    model(**data)["loss"].backward()
    optimizer.step()
    assert sched.last_epoch == 2


def test_default_optimizer_is_adamw_and_leaves_nothing_behind():
    model = lora()
    data = batch(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = gradflow.probe(model, data, steps=1)
    steps = report.to_dict()["steps"]
    assert steps["optimizer"] == "AdamW" and steps["optimizer_source"] == "default" and steps["lrs"] == [[1e-3]]
    assert steps["params_changed"] == steps["params_tracked"] == len(_trainable(model))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n


def test_trainer_optimizer_with_zero_learning_rate(tmp_path):
    """A Trainer's own optimizer and scheduler are the ones stepped; learning_rate=0 is caught."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from gradflow.setup.presets import build_preset, build_tokenizer

    tok = build_tokenizer()
    model = get_peft_model(build_preset("tiny-llama", seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                      task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"input_ids": [list(range(5, 21))] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=0.0,
                             report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = gradflow.probe(trainer, steps=2)
    run = report.snapshot.steps
    assert run.optimizer_source == "trainer" and run.scheduler is not None
    assert "zero-learning-rate" in report.slugs()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    assert trainer.optimizer is None  # the trainer is put back as found


FACTORY = '''
import torch
from peft import LoraConfig, get_peft_model
from torch.optim.lr_scheduler import LambdaLR
from gradflow.setup.presets import build_preset


def _lora():
    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                     task_type="CAUSAL_LM"))


def early_optimizer():
    base = build_preset("tiny-llama", seed=0)
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-3)   # built before get_peft_model
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    return {"model": model, "optimizer": optimizer}


def zeroed():
    model = _lora()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return {"model": model, "optimizer": optimizer, "lr_scheduler": LambdaLR(optimizer, lambda step: 0.0)}


def healthy():
    model = _lora()
    return {"model": model, "optimizer": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])}
'''


def test_cli_steps(tmp_path):
    (tmp_path / "setups.py").write_text(FACTORY)
    spec = f"{tmp_path / 'setups.py'}"
    early = invoke("probe-backward", f"{spec}:early_optimizer", "--steps", "2", "--seq-len", "16", "--format", "json")
    assert early.code == 1, early.stderr
    data = early.json()
    assert "param-not-in-optimizer" in [f["slug"] for f in data["findings"]]
    assert data["steps"]["params_changed"] == 0
    assert all(not p["in_optimizer"] and not p["has_state"] for p in data["steps"]["not_changed"])

    zeroed = invoke("probe-backward", f"{spec}:zeroed", "--steps", "2", "--seq-len", "16")
    assert zeroed.code == 1, zeroed.stderr
    assert "GF142 zero-learning-rate" in zeroed.stdout and "scheduler LambdaLR" in zeroed.stdout

    healthy = invoke("probe-backward", f"{spec}:healthy", "--steps", "2", "--seq-len", "16")
    assert healthy.code == 0, healthy.stdout
    assert "steps: 2 × AdamW (given)" in healthy.stdout

    bad = invoke("probe-backward", "tiny-phi3", "--steps", "-1")
    assert bad.code == 2 and "--steps must be an integer from 0" in bad.stderr
