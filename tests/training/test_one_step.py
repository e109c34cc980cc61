"""The moved-weights check judges only what can have moved: a 1-step run is not a false `adapter-not-updated`.

With PEFT's default init lora_B starts at zero, so lora_A's first gradient is zero and it moves at optimizer step
2 at the earliest (and warmup steps at lr 0 move nothing). Weights the optimizer never updates are still caught.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from gradflow import GradFlowCallback
from gradflow.setup.presets import build_preset
from gradflow.setup.build import apply_lora
from tests.helpers.cli import gradflow

pytestmark = pytest.mark.slow  # every test runs a real Trainer.train()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = torch.randint(3, 512, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def _lora():
    return apply_lora(build_preset("tiny-phi3", seed=0), 4, 8, "all-linear")


def _train(tmp_path, model, cb, *, steps, keep=None, warmup=0):
    """A plain Trainer run; `keep` selects the parameters the optimizer holds (the rest never move)."""
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-3, warmup_steps=warmup, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    optimizers = (None, None)
    if keep is not None:
        held = [p for n, p in model.named_parameters() if p.requires_grad and keep(n)]
        optimizers = (torch.optim.AdamW(held, lr=1e-3), None)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb], optimizers=optimizers)
    trainer.train()
    return trainer


def test_one_step_judges_lora_b_and_leaves_lora_a_with_a_note(tmp_path, capsys):
    cb = GradFlowCallback(moved_at_step=1, preflight=False)
    _train(tmp_path, _lora(), cb, steps=1)
    assert cb.findings == [] and cb.stopped_at is None and cb.moved_checked
    moved = cb.moved()
    assert cb.moved_not_judged and all(".lora_A." in n for n in cb.moved_not_judged)
    assert all(moved[n] for n in moved if ".lora_B." in n)
    assert not any(moved[n] for n in cb.moved_not_judged)  # lora_A truly cannot move at step 1
    err = capsys.readouterr().err
    assert "not judged" in err and "needs 2 optimizer steps that update" in err
    assert "the run ends before they can move" in err


def test_one_step_still_catches_weights_the_optimizer_never_updates(tmp_path):
    # the optimizer holds layer 0 only: every other lora_B can move at step 1 and does not
    cb = GradFlowCallback(moved_at_step=1, preflight=False)
    _train(tmp_path, _lora(), cb, steps=1, keep=lambda n: ".layers.0." in n)
    assert [f.slug for f in cb.findings] == ["adapter-not-updated"]
    params = cb.findings[0].params
    assert params and all(".lora_B." in n and ".layers.0." not in n for n in params)


def test_weights_not_judged_at_moved_at_step_are_judged_when_they_can_move(tmp_path, capsys):
    # every lora_B is updated, but layer 1's lora_A is not in the optimizer: judged, and caught, at step 2
    cb = GradFlowCallback(moved_at_step=1, preflight=False)
    keep = lambda n: not (".layers.1." in n and ".lora_A." in n)  # noqa: E731
    trainer = _train(tmp_path, _lora(), cb, steps=4, keep=keep)
    assert [f.slug for f in cb.findings] == ["adapter-not-updated"]
    assert cb.findings[0].message.startswith("step 2: ")
    assert all(".layers.1." in n and ".lora_A." in n for n in cb.findings[0].params)
    assert trainer.state.global_step == 2 and cb.moved_not_judged == []
    assert "judged at the first later step they can move" in capsys.readouterr().err


def test_three_steps_judge_lora_a_too(tmp_path):
    cb = GradFlowCallback(moved_at_step=3, preflight=False)
    _train(tmp_path, _lora(), cb, steps=3, keep=lambda n: ".layers.0." in n)
    assert [f.slug for f in cb.findings] == ["adapter-not-updated"]
    params = cb.findings[0].params
    assert any(".lora_A." in n for n in params) and any(".lora_B." in n for n in params)
    assert cb.moved_not_judged == []


def test_warmup_steps_at_lr_zero_do_not_count(tmp_path, capsys):
    # linear warmup over 2 steps: lr is 0 at step 1, so lora_B moves at step 2 and lora_A at step 3
    cb = GradFlowCallback(moved_at_step=2, preflight=False)
    _train(tmp_path, _lora(), cb, steps=3, warmup=2)
    assert cb.findings == [] and cb.moved_not_judged == [] and all(cb.moved().values())
    assert "1 of 2 steps updated nothing (learning rate 0 in warmup" in capsys.readouterr().err


def test_train_cli_one_step_completes_and_saves_the_adapter(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" answer {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    run = gradflow("train", "tiny-phi3", "--data", data, "--output", out, "--max-steps", "1", "--seq-len", "64",
                   "--gc", "off")
    assert run.code == 0, run.stderr[-3000:]
    assert "adapter-not-updated" not in run.stdout + run.stderr
    assert "cannot have moved yet" in run.stderr  # the note says what was not judged, and why
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["status"] == "completed" and report["train"]["steps"] == 1
    assert "adapter-not-updated" not in [f["slug"] for f in report["train"]["findings"] + report["findings"]]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
