"""GradFlowCallback's pre-flight: a user's own Trainer + PEFT script, judged at on_train_begin before any step.

Each broken case is first shown to break without the callback (the raw RuntimeError, or adapters that never move)
on the stack where it breaks; then the callback names it with its location and fix, and with raise_on_error
`trainer.train()` raises GradflowError carrying the finding. Healthy set-ups stay silent, and a run with the
pre-flight trains to bit-identical weights.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from gradflow import GradFlowCallback
from gradflow.errors import GradflowError
from gradflow.setup.presets import build_preset, build_tokenizer
from tests.helpers.env import stack

pytestmark = pytest.mark.slow  # every test runs a real Trainer.train()

GF101 = "reentrant-checkpoint-no-input-grad"
RAW = "does not require grad and does not have a grad_fn"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ds(tok):
    data = Dataset.from_dict({"text": [f"sample {i} says hello world" for i in range(16)]})
    return data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def _lora(seed=0, **config):
    torch.manual_seed(seed)  # LoRA's init draws from the global RNG
    return get_peft_model(build_preset("tiny-llama", seed=seed),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                     **config))


def _trainer(tmp_path, model, tok, ds, callback=None, optimizer=None, **args):
    targs = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                              learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                              **args)
    return Trainer(model=model, args=targs, train_dataset=ds,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                   callbacks=[callback] if callback is not None else [], optimizers=(optimizer, None))


def _weights(model, part="lora_B"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


def _moved(model, start) -> int:
    return sum(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def _problems(cb):
    return [f for f in cb.findings if f.severity in ("error", "warning")]


def _assert_healthy_preflight(cb):
    assert cb.preflight_report is not None
    assert not cb.preflight_report.fails("warning"), cb.preflight_report.findings
    assert cb.findings == [] and cb.stopped_at is None


# ----- reentrant checkpointing turned on by the Trainer (issue 7) ----------------------------------------------
def test_loud_reentrant_checkpointing_is_named_before_the_raw_error(tmp_path, tok, ds, capsys):
    if stack() == "new":  # 5.x: non-reentrant by default, the same script is healthy
        cb = GradFlowCallback()
        model = _lora()
        start = _weights(model)
        _trainer(tmp_path, model, tok, ds, cb, gradient_checkpointing=True).train()
        _assert_healthy_preflight(cb)
        assert _moved(model, start) == len(start)
        return
    with pytest.raises(RuntimeError, match=RAW):  # without the callback: the raw error, nothing else
        _trainer(tmp_path, _lora(), tok, ds, gradient_checkpointing=True).train()
    capsys.readouterr()
    cb = GradFlowCallback()
    # the Trainer reads should_training_stop only after a step: the first step still runs and raises
    with pytest.raises(RuntimeError, match=RAW):
        _trainer(tmp_path, _lora(), tok, ds, cb, gradient_checkpointing=True).train()
    err = capsys.readouterr().err  # ... but the cause was printed before it
    line = next(ln for ln in err.splitlines() if GF101 in ln)
    assert line.startswith("gradflow: pre-flight error: GF101 ")
    assert "at base_model.model.model.layers.0" in line and "the loss has no grad_fn" in line
    assert "fix: " in line and '"use_reentrant": False' in line
    assert [(f.slug, f.location) for f in _problems(cb)] == [(GF101, "base_model.model.model.layers.0")]
    assert cb.stopped_at == 0


def test_loud_reentrant_checkpointing_raises_gradflow_error_before_the_first_step(tmp_path, tok, ds):
    cb = GradFlowCallback(raise_on_error=True)
    model = _lora()
    trainer = _trainer(tmp_path, model, tok, ds, cb, gradient_checkpointing=True)
    if stack() == "new":
        trainer.train()
        _assert_healthy_preflight(cb)
        return
    with pytest.raises(GradflowError) as err:
        trainer.train()
    assert [f.slug for f in err.value.findings] == [GF101]
    assert "before its first step" in str(err.value)
    assert f"GF101 {GF101} at base_model.model.model.layers.0" in str(err.value) and "fix: " in str(err.value)
    assert trainer.state.global_step == 0
    assert cb._hook is None  # nothing of the callback is left on the model


def test_silent_reentrant_checkpointing_is_named_where_adapters_would_never_move(tmp_path, tok, ds, capsys):
    # modules_to_save=["lm_head"]: lm_head after the cut is trainable, so the loss has a grad_fn and nothing raises
    def model():
        return _lora(modules_to_save=["lm_head"])

    if stack() == "new":
        cb = GradFlowCallback()
        _trainer(tmp_path, model(), tok, ds, cb, gradient_checkpointing=True).train()
        assert not [f for f in _problems(cb)], cb.findings
        return
    plain = model()
    start = _weights(plain)
    _trainer(tmp_path, plain, tok, ds, gradient_checkpointing=True).train()
    assert _moved(plain, start) == 0  # without the callback: 3 steps, not one lora_B moved, no error
    capsys.readouterr()

    cb = GradFlowCallback()
    trainer = _trainer(tmp_path, model(), tok, ds, cb, gradient_checkpointing=True)
    trainer.train()
    assert cb.findings[0].slug == GF101 and cb.findings[0].location == "base_model.model.model.layers.0"
    assert "silent" in cb.findings[0].message
    assert trainer.state.global_step == 1  # stopped after the one step the Trainer always runs
    # the fix for this Trainer's own set-up travels with the finding, as a probe of the Trainer gives it
    assert '"use_reentrant": False' in cb.findings[0].fix.here
    err = capsys.readouterr().err
    assert "gradflow: pre-flight error: GF101" in err and f"| here: {cb.findings[0].fix.here}" in err

    cb = GradFlowCallback(raise_on_error=True)
    with pytest.raises(GradflowError) as err:
        _trainer(tmp_path, model(), tok, ds, cb, gradient_checkpointing=True).train()
    assert GF101 in [f.slug for f in err.value.findings]


def test_non_reentrant_checkpointing_is_healthy_on_both_stacks(tmp_path, tok, ds):
    cb = GradFlowCallback(raise_on_error=True)
    model = _lora(modules_to_save=["lm_head"])
    start = _weights(model)
    _trainer(tmp_path, model, tok, ds, cb, gradient_checkpointing=True,
             gradient_checkpointing_kwargs={"use_reentrant": False}).train()
    assert not [f for f in _problems(cb) if f.severity == "error"], cb.findings
    assert not [f for f in cb.preflight_report.findings if f.slug == GF101]
    assert _moved(model, start) == len(start)


# ----- the optimizer, a frozen adapter, intended parameters ---------------------------------------------------
def _first_layer_optimizer(model):
    return torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n],
                             lr=1e-2)


def test_parameters_missing_from_the_optimizer_are_named_before_the_first_step(tmp_path, tok, ds, capsys):
    plain = _lora()
    start = _weights(plain)
    _trainer(tmp_path, plain, tok, ds, optimizer=_first_layer_optimizer(plain)).train()
    still = [n for n, p in plain.named_parameters() if n in start and torch.equal(p, start[n])]
    assert still and all(".layers.0." not in n for n in still)  # without the callback: they never move
    capsys.readouterr()

    cb = GradFlowCallback()
    model = _lora()
    trainer = _trainer(tmp_path, model, tok, ds, cb, optimizer=_first_layer_optimizer(model))
    trainer.train()
    (f,) = _problems(cb)
    assert f.slug == "param-not-in-optimizer" and ".layers.1." in f.location and f.fix is not None
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "param-not-in-optimizer" in ln)
    assert f"at {f.location}" in line and f"fix: {f.fix.title}" in line and "after its first step" in line
    assert cb.stopped_at == 0 and trainer.state.global_step == 1  # both stacks run the first step, then stop

    model = _lora()
    start = _weights(model, "lora")
    cb = GradFlowCallback(raise_on_error=True)
    trainer = _trainer(tmp_path, model, tok, ds, cb, optimizer=_first_layer_optimizer(model))
    with pytest.raises(GradflowError) as err:
        trainer.train()
    assert [f.slug for f in err.value.findings] == ["param-not-in-optimizer"]
    assert _moved(model, start) == 0 and trainer.state.global_step == 0  # stopped before any step


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    _lora().save_pretrained(str(directory))
    return str(directory)


def _reloaded(adapter_dir):
    return PeftModel.from_pretrained(build_preset("tiny-llama", seed=0), adapter_dir)  # no is_trainable: frozen


def test_frozen_adapter_is_named_rather_than_nothing_trainable(tmp_path, tok, ds, adapter_dir, capsys):
    with pytest.raises(RuntimeError, match=RAW):  # both stacks: the raw error at the first backward
        _trainer(tmp_path, _reloaded(adapter_dir), tok, ds).train()
    capsys.readouterr()

    cb = GradFlowCallback()
    with pytest.raises(RuntimeError, match=RAW):
        _trainer(tmp_path, _reloaded(adapter_dir), tok, ds, cb).train()
    slugs = [f.slug for f in _problems(cb)]
    assert slugs == ["adapter-frozen"]  # the specific cause wins over the generic no-trainable-parameters
    assert cb.findings[0].location == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "adapter-frozen" in ln)
    assert "is_trainable=True" in line and "at base_model.model.model.layers.0" in line

    cb = GradFlowCallback(raise_on_error=True)
    with pytest.raises(GradflowError) as err:
        _trainer(tmp_path, _reloaded(adapter_dir), tok, ds, cb).train()
    assert [f.slug for f in err.value.findings] == ["adapter-frozen"]


def test_intended_parameters_that_are_frozen_are_named(tmp_path, tok, ds):
    plain = _lora()
    start = _weights(plain, "lm_head")
    _trainer(tmp_path, plain, tok, ds).train()
    assert _moved(plain, start) == 0  # the user meant lm_head to train: without the callback nothing says it did not

    cb = GradFlowCallback(trainable=r"lm_head")
    _trainer(tmp_path, _lora(), tok, ds, cb).train()
    assert [(f.slug, f.location) for f in _problems(cb)] == [("intended-param-frozen", "base_model.model.lm_head")]

    # preflight=False: the same check, static (no forward), and raised for CI
    cb = GradFlowCallback(trainable=r"lm_head", preflight=False, raise_on_error=True)
    with pytest.raises(GradflowError) as err:
        _trainer(tmp_path, _lora(), tok, ds, cb).train()
    assert [f.slug for f in err.value.findings] == ["intended-param-frozen"] and cb.preflight_report is None


def test_a_trainable_regex_that_names_nothing_is_an_error(tmp_path, tok, ds):
    with pytest.raises(GradflowError, match="matches no parameter"):
        _trainer(tmp_path, _lora(), tok, ds, GradFlowCallback(trainable=r"no_such_param")).train()
    with pytest.raises(Exception):
        GradFlowCallback(trainable=r"(unclosed")


# ----- side effects -------------------------------------------------------------------------------------------
def test_the_preflight_leaves_training_bit_identical(tmp_path, tok, ds):
    # lora_dropout draws from the RNG and the sampler shuffles: a moved RNG or a consumed batch would show
    def run(callback):
        model = _lora(lora_dropout=0.1)
        trainer = _trainer(tmp_path, model, tok, ds, callback, seed=0)
        trainer.train()
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    cb = GradFlowCallback(preflight=True)
    with_cb, after = run(cb)
    _, plain = run(None)
    _assert_healthy_preflight(cb)
    assert with_cb.state.global_step == 3
    assert after.keys() == plain.keys()
    assert [n for n in plain if not torch.equal(after[n], plain[n])] == []
    assert any("lora_B" in n and not torch.equal(p, torch.zeros_like(p)) for n, p in after.items())  # it trained


def test_a_trainer_with_its_own_loss_is_not_blamed_for_a_model_without_one(tmp_path, tok, ds, capsys):
    from transformers import DataCollatorWithPadding

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())

    cb = GradFlowCallback(raise_on_error=True)
    model = _lora()
    start = _weights(model)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    # no labels in the batch: the model returns no loss, only the Trainer's compute_loss makes one
    OwnLoss(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
            callbacks=[cb]).train()
    assert cb.findings == [] and _moved(model, start) == len(start)
    assert "returns no loss for the first batch" in capsys.readouterr().err


def test_a_preflight_error_is_not_said_again_at_step_one(tmp_path, tok, ds, capsys):
    """Layer 0 under torch.no_grad(): the pre-flight names the cut (graph-break); the step the Trainer still runs
    must not add grad-missing-in-training for the same parameters."""
    from tests.helpers.peft_methods import NoGradPrefix

    model = _lora(modules_to_save=["lm_head"])  # lm_head after the cut trains: nothing raises
    layers = model.get_base_model().model.layers
    layers[0] = NoGradPrefix(layers[0])
    cb = GradFlowCallback()
    _trainer(tmp_path, model, tok, ds, cb).train()
    assert [f.slug for f in cb.findings] == ["graph-break"], [(f.slug, f.message) for f in cb.findings]
    assert cb.stopped_at is not None
