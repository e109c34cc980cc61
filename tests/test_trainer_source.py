"""A Trainer as MODEL: gradflow judges the setup `train()` will run, and leaves the trainer as it found it."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.dist import free_port
from tests.helpers.env import stack

gradflow = pytest.importorskip("gradflow")


def _trainer(out_dir, *, gc_kwargs=None, optimizer=None, modules_to_save=None, seed=0, cls=None):
    """A user's Trainer + PEFT script: checkpointing asked for in TrainingArguments, turned on inside train()."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from gradflow.setup.presets import build_preset, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = get_peft_model(build_preset("tiny-llama", seed=seed),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                      modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"text": [f"sample {i} says hello to the world" for i in range(12)]})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, seed=seed, warmup_steps=1)
    opt = optimizer(model) if optimizer else None
    return (cls or Trainer)(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow  # Trainer.train() on 4.57
def test_trainer_checkpointing_is_judged_as_train_will_run_it(tmp_path):
    trainer = _trainer(tmp_path)
    before = gradflow.probe(trainer.model)  # the model alone: checkpointing is still off
    assert before.model["gradient_checkpointing"] == "off"
    report = gradflow.probe(trainer)
    if stack() == "old":  # 4.57: the Trainer turns on reentrant checkpointing and installs no input-grad hook
        assert report.model["gradient_checkpointing"] == "reentrant"
        gf101 = [f for f in report.findings if f.slug == "reentrant-checkpoint-no-input-grad"]
        assert gf101 and gf101[0].location == "base_model.model.model.layers.0" and gf101[0].fix is not None
        assert report.fails("error")
        with pytest.raises(RuntimeError, match="does not require grad"):  # and it really breaks training
            trainer.train()
    else:  # 5.x: non-reentrant by default
        assert report.model["gradient_checkpointing"] == "non-reentrant"
        assert not report.fails("warning"), report.findings


@pytest.mark.slow  # Trainer.train()
def test_probe_leaves_the_trainer_and_its_run_unchanged(tmp_path):
    """probe(trainer), then train(): bit-identical to a run never probed; nothing written, no step taken."""
    plain = _trainer(tmp_path / "plain", gc_kwargs={"use_reentrant": False})
    plain.train()
    expected = _params(plain)

    probed = _trainer(tmp_path / "probed", gc_kwargs={"use_reentrant": False})
    callbacks = list(probed.callback_handler.callbacks)
    start = _params(probed)
    report = gradflow.probe(probed)
    assert report.params["with_grad"] == report.params["trainable"] > 0
    assert _files(tmp_path / "probed") == []  # no log, checkpoint or state file
    assert probed.optimizer is None and probed.lr_scheduler is None and probed.state.global_step == 0
    assert probed.callback_handler.callbacks == callbacks
    assert not probed.model.get_base_model().is_gradient_checkpointing  # the trainer's preparation is undone
    assert all(torch.equal(start[n], p) for n, p in probed.model.named_parameters())
    probed.train()
    got = _params(probed)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_user_optimizer_is_probed_and_left_as_given(tmp_path):
    def lora_a_only(model):
        return torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n], lr=1e-2)

    trainer = _trainer(tmp_path, gc_kwargs={"use_reentrant": False}, optimizer=lora_a_only)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    report = gradflow.probe(trainer)
    missing = [f for f in report.findings if f.slug == "param-not-in-optimizer"]
    assert missing and all("lora_B" in p for p in missing[0].params)
    assert [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups] == groups
    assert not trainer.optimizer.state  # no step, no Adam moments


def test_custom_compute_loss_is_the_loss_probed(tmp_path):
    from transformers import Trainer

    class DetachedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(**inputs)
            loss = out.loss.detach().requires_grad_()  # "fixes" the error message, trains nothing
            return (loss, out) if return_outputs else loss

    trainer = _trainer(tmp_path, gc_kwargs={"use_reentrant": False}, cls=DetachedLoss)
    report = gradflow.probe(trainer)
    assert "loss-detached" in report.slugs(), report.findings
    assert "loss-detached" not in gradflow.probe(trainer.model).slugs()  # the model alone is fine: the loss is not


@pytest.mark.slow  # Trainer.train()
def test_patch_trainer_fix_survives_into_train(tmp_path):
    trainer = _trainer(tmp_path, modules_to_save=["lm_head"])  # the silent variant: lm_head keeps a grad_fn
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    report = gradflow.patch(trainer)
    assert report.extra["verification"]["ok"], report.extra["verification"]
    if stack() == "old":
        assert "reentrant-checkpoint-no-input-grad" in report.before.slugs()
        assert [r["id"] for r in report.fixes_applied if r["id"] == "input-grad-hook"]
    # the proof is a fresh probe of the trainer, with its checkpointing set up again by train()'s preparation
    assert report.after.model["gradient_checkpointing"] != "off"
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in lora_b and not torch.equal(lora_b[n], p)]
    assert len(moved) == len(lora_b) > 0


def test_sft_trainer_with_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig

    from gradflow.setup.presets import build_preset, build_tokenizer

    tok = build_tokenizer()
    ds = Dataset.from_dict({"text": [f"sample {i} says hello to the world" for i in range(8)]})
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, gradient_checkpointing=True, max_length=32)
    trainer = trl.SFTTrainer(model=build_preset("tiny-llama", seed=0), args=args, train_dataset=ds,
                             processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    metrics = {k: {m: len(v) for m, v in d.items()} for k, d in getattr(trainer, "_metrics", {}).items()}
    report = gradflow.probe(trainer)
    assert report.model["peft"] and report.params["trainable"] > 0
    assert report.params["with_grad"] == report.params["trainable"]
    assert not report.fails("warning"), report.findings
    after = {k: {m: len(v) for m, v in d.items()} for k, d in getattr(trainer, "_metrics", {}).items()}
    assert {k: {m: n for m, n in d.items() if n} for k, d in after.items()} == \
        {k: {m: n for m, n in d.items() if n} for k, d in metrics.items()}  # compute_loss's metrics taken back
    assert _files(tmp_path) == []


@pytest.mark.slow  # a real SFTTrainer
def test_sft_trainer_whose_max_length_truncates_every_completion(tmp_path):
    """Prompts longer than max_length: TRL 1.x drops every example (then the sampler's raw 'num_samples=0'), TRL 0.x
    keeps them with every label masked. Either way the user learns that truncation to max_length is the cause."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from gradflow.errors import GradflowError
    from gradflow.setup.presets import build_preset, build_tokenizer

    system = "You are a helpful assistant. Answer in one short, polite sentence.\n"
    ds = Dataset.from_dict({"prompt": [f"{system}Q: what is {i} plus {i}?\nA: " for i in range(4)],
                            "completion": [f"{2 * i}." for i in range(4)]})
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, max_length=16)
    trainer = trl.SFTTrainer(model=build_preset("tiny-gpt2", seed=0), args=args, train_dataset=ds,
                             processing_class=build_tokenizer())
    if len(trainer.train_dataset) == 0:  # TRL 1.x
        with pytest.raises(GradflowError) as raised:
            gradflow.probe(trainer)
        text = str(raised.value)
        assert "truncation to max_length=16" in text and "num_samples" not in text, text
        assert "Raise max_length above the longest prompt" in raised.value.todo
        with pytest.raises(ValueError, match="num_samples=0"):  # what the user gets without gradflow
            trainer.train()
    else:  # TRL 0.x
        assert "no-supervised-tokens" in gradflow.probe(trainer).slugs()


_GC_FACTORY = """
import tempfile
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from gradflow.setup.presets import build_preset, build_tokenizer

def build():
    tok = build_tokenizer()
    model = get_peft_model(build_preset("tiny-llama", seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"text": ["sample says hello"] * 4}).map(lambda b: tok(b["text"]), batched=True,
                                                                    remove_columns=["text"])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, max_steps=1,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
                             report_to=[], save_strategy="no", use_cpu=True)
    return Trainer(model=model, args=args, train_dataset=ds,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
"""


@pytest.mark.slow  # Trainer.train() up to its first step, through the API and the CLI
def test_the_trainer_aware_fix_is_given_by_the_api_and_the_cli(tmp_path):
    """Checkpointing is set in TrainingArguments, and train() overrides a call on the model: the fix says where to
    set it, as GradFlowCallback does; the CLI adds the factory file's TrainingArguments line."""
    from tests.helpers.cli import invoke
    from tests.helpers.env import REPO

    wanted = 'TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})'
    report = gradflow.probe(_trainer(tmp_path / "api", gc_kwargs={"use_reentrant": True}))
    factory = tmp_path / "factory.py"
    factory.write_text(_GC_FACTORY)
    run = invoke("probe-backward", f"{factory}:build", "--format", "json", cwd=REPO)
    if stack() == "new":  # transformers 5 installs the input-grad hook when it turns reentrant checkpointing on
        assert "reentrant-checkpoint-no-input-grad" not in report.slugs() and run.code == 0, run.stdout[-2000:]
        return
    (finding,) = [f for f in report.findings if f.slug == "reentrant-checkpoint-no-input-grad"]
    assert finding.fix.here == wanted  # the API: no file to point at
    assert finding.to_dict()["fix"]["here"] == wanted
    assert all("here" not in f.to_dict()["fix"] for f in report.findings if f is not finding and f.fix)
    assert run.code == 1, run.stderr[-2000:]
    (cli,) = [f for f in run.json()["findings"] if f["slug"] == "reentrant-checkpoint-no-input-grad"]
    assert cli["fix"]["here"] == f"{wanted} at {factory}:14"  # the factory's TrainingArguments( line
    text = invoke("probe-backward", f"{factory}:build", cwd=REPO).stdout
    assert "here: TrainingArguments(gradient_checkpointing=True" in text, text


_MODEL_ONLY = """
import tempfile
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from gradflow.setup.presets import build_preset

def build_model():
    return get_peft_model(build_preset("tiny-llama", seed=0),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))

def plain():
    return build_preset("tiny-llama", seed=0)

def main():
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), gradient_checkpointing=True, bf16=False,
                             per_device_train_batch_size=2, max_steps=1, report_to=[])
    Trainer(model=build_model(), args=args).train()
"""


def test_a_factory_returning_the_model_of_a_trainer_script_gets_one_note(tmp_path):
    """The file turns on checkpointing through TrainingArguments, the factory returns only the model: the probe
    sees no checkpointing (on 4.57 the run trains nothing), and one note on stderr says to probe the Trainer."""
    from gradflow.report.render.source_lines import trainer_settings
    from tests.helpers.cli import invoke_main

    factory = tmp_path / "train.py"
    factory.write_text(_MODEL_ONLY)
    run = invoke_main("probe-backward", f"{factory}:build_model", "--format", "json", cwd=tmp_path)
    assert run.code == 0 and run.json()["model"]["gradient_checkpointing"] == "off", run.stderr[-2000:]
    notes = [line for line in run.stderr.splitlines() if line.startswith("gradflow: note:")]
    assert notes == [f"gradflow: note: {factory}:build_model returns the model, and its file turns on checkpointing "
                     "through a Trainer (TrainingArguments(gradient_checkpointing=True) at train.py:15), which this "
                     "probe of the model alone did not see: probe the Trainer (return it from the factory) to see "
                     "the run as it will execute"], run.stderr[-2000:]
    assert "gradflow: note:" not in invoke_main("probe-backward", f"{factory}:build_model", "-q", cwd=tmp_path).stderr
    report = gradflow.probe(f"{factory}:plain")  # the API: the same note, on the report
    assert len(report.notes) == 1 and "probe the Trainer" in report.notes[0]
    assert trainer_settings(f"{tmp_path / 'missing.py'}:build") == []


def test_silent_note_for_a_factory_file_without_a_trainer(tmp_path):
    factory = tmp_path / "model.py"
    factory.write_text(_MODEL_ONLY.split("def main")[0])
    assert gradflow.probe(f"{factory}:build_model").notes == []



def test_the_note_survives_the_gathered_torchrun_report(tmp_path, monkeypatch):
    """Under torchrun (--ddp, here torchrun's environment for one gloo rank, in-process) the report is rebuilt from
    every rank's gradients: the note about the file's Trainer still comes with it (that path returned before it)."""
    import torch.distributed as dist

    from tests.helpers.cli import invoke_main

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    factory = tmp_path / "train.py"
    factory.write_text(_MODEL_ONLY)
    run = invoke_main("probe-backward", f"{factory}:build_model", "--ddp", "--format", "json", cwd=tmp_path)
    assert run.code == 0 and run.json()["distributed"]["wrapper"] == "ddp", run.stderr[-2000:]
    notes = [line for line in run.stderr.splitlines() if line.startswith("gradflow: note:")]
    assert len(notes) == 1 and "turns on checkpointing through a Trainer" in notes[0], run.stderr[-2000:]
    assert not dist.is_initialized()  # the command's end tore its process group down
