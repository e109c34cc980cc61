"""GradFlowCallback's requires_grad watch: a parameter trainable when the first step began whose flag goes off in
a step is `requires-grad-changed` (not `grad-missing-in-training`), naming the module; a run that freezes nothing,
or freezes a module before the first step (before train(), or in a callback's on_train_begin), stays silent."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from gradflow import GradFlowCallback
from gradflow.errors import GradflowError
from gradflow.setup.build import apply_lora
from gradflow.setup.presets import build_preset
from tests.training.test_callback import _Rows

pytestmark = pytest.mark.slow  # real Trainers, 2 steps each
SLUG = "requires-grad-changed"
LAYER1 = "base_model.model.model.layers.1"


def _layer(model, i):
    return model.get_base_model().model.layers[i]


class FreezingTrainer(Trainer):
    """A compute_loss that freezes layer 1 before its forward (a 'freeze the top layers' experiment left in)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        _layer(model, 1).requires_grad_(False)
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class FreezeLayer0(TrainerCallback):
    """A user's callback that freezes layer 0 when training begins, before any step: deliberate."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _layer(model, 0).requires_grad_(False)


def _trainer(tmp_path, cls=Trainer, callbacks=(), steps=2):
    model = apply_lora(build_preset("tiny-phi3", seed=0), 4, 8, "all-linear")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    return cls(model=model, args=args, train_dataset=_Rows(n=8), callbacks=list(callbacks))


def test_a_compute_loss_that_freezes_a_layer_is_named_at_the_first_step(tmp_path):
    cb = GradFlowCallback(moved_at_step=2)
    trainer = _trainer(tmp_path, FreezingTrainer, [cb])
    trainer.train()
    assert [f.slug for f in cb.findings] == [SLUG]  # not grad-missing-in-training, not adapter-not-updated
    (found,) = cb.findings
    assert found.location == LAYER1 and cb.stopped_at == 1
    assert found.params and all(p.startswith(f"{LAYER1}.") and ".lora_" in p for p in found.params)
    assert len(found.params) == sum(1 for n, _ in _layer(trainer.model, 1).named_parameters() if ".lora_" in n)
    assert "step 1:" in found.message and "requires_grad went off inside the step" in found.message
    assert found.fix is not None and found.fix.applicability == "display-only"


def test_raise_on_error_raises_it(tmp_path):
    trainer = _trainer(tmp_path, FreezingTrainer, [GradFlowCallback(raise_on_error=True)])
    with pytest.raises(GradflowError) as caught:
        trainer.train()
    assert [f.slug for f in caught.value.findings] == [SLUG]
    assert "at step 1" in str(caught.value) and LAYER1 in str(caught.value)


def test_silent_when_nothing_is_frozen(tmp_path):
    cb = GradFlowCallback(moved_at_step=2)
    _trainer(tmp_path, callbacks=[cb]).train()
    assert cb.findings == [] and cb.stopped_at is None
    assert cb._flags is not None and cb._flags.flipped == []  # the watch ran, and saw nothing


@pytest.mark.parametrize("order", ["freeze-first", "gradflow-first"])
def test_silent_when_a_callback_freezes_a_layer_before_the_first_step(order, tmp_path):
    """The flags are kept when the first step begins, after every on_train_begin: the callbacks' order is free."""
    cb = GradFlowCallback(moved_at_step=2, preflight=False)
    callbacks = [FreezeLayer0(), cb] if order == "freeze-first" else [cb, FreezeLayer0()]
    trainer = _trainer(tmp_path, callbacks=callbacks)
    trainer.train()
    assert cb.findings == [] and cb.stopped_at is None
    watched = {n for n, _ in cb._params}
    assert watched and not any(".layers.0." in n for n in watched)  # the frozen layer is not watched
    assert trainer.state.global_step == 2


class FreezeLayer0AfterStep1(TrainerCallback):
    """Gradual freezing: a user's callback freezes layer 0 once the first step has ended."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            _layer(model, 0).requires_grad_(False)


def test_silent_when_a_callback_freezes_a_layer_between_steps(tmp_path):
    """Frozen between steps (on_step_end) is deliberate: no requires-grad-changed, and the frozen layer's missing
    gradients at later checks are not grad-missing-in-training."""
    cb = GradFlowCallback(check_every=1, moved_at_step=3)
    trainer = _trainer(tmp_path, callbacks=[cb, FreezeLayer0AfterStep1()], steps=3)
    trainer.train()
    assert cb.findings == [] and cb.stopped_at is None and trainer.state.global_step == 3
    assert cb._flags.between and all(".layers.0." in n for n in cb._flags.between)
