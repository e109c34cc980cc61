"""The pre-flight, one path for `gradflow train` and GradFlowCallback: probe the setup before any step.

`gradflow train` probes a batch shaped as training will shape it (packed when packing is on, so that
`packed-attention-leak` is checked), patches what it finds, and re-probes; the callback in a user's own Trainer
probes the run's first batch with its model and optimizer, and reports (it patches nothing)."""

from __future__ import annotations

import os

from gradflow import api
from gradflow.errors import GradflowError
from gradflow.fixes.recipe_file import apply_recipe as apply_saved, load_recipe
from gradflow.forward import model_device, to_device
from gradflow.model_state import kept_rng
from gradflow.setup.trainer_source import first_batch


def apply_recipe(setup, path: str, batch=None) -> list:
    if not os.path.exists(path):
        raise GradflowError(f"--recipe {path} does not exist", "Pass the directory written by 'gradflow patch --save'")
    recipe = load_recipe(path)
    return list(apply_saved(setup.model, recipe, batch) or [])


def preflight(model, batch, *, loss_fn=None, optimizer=None, trainable: str | None = None, patch: bool = False,
              unsafe: bool = False, say=None) -> dict:
    """The one pre-flight: probe `batch`; with `patch` (train), patch what an error or warning names, and patch's
    own re-probe is the probe after (no fourth pass). Returns the reports: before, patch (or None), after."""
    before = api.probe(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable)
    patched = None
    if patch and any(f.severity in ("error", "warning") for f in before.findings):
        (say or (lambda text: None))("pre-flight: patching")
        patched = api.patch(model, batch, loss_fn=loss_fn, trainable=trainable, unsafe=unsafe)
    after = patched.after if patched is not None else before
    return {"before": before, "patch": patched, "after": after, "patch_available": patch}


def trainer_preflight(model, args, kwargs: dict, *, trainable: str | None, note) -> tuple:
    """GradFlowCallback's pre-flight at on_train_begin: the run's first batch probed with its model and optimizer.
    Returns (the probe's Report or None, its findings); a probe that fails is noted, and training goes on."""
    loader = kwargs.get("train_dataloader")
    if loader is None:
        note("pre-flight skipped: the Trainer passed no train dataloader")
        return None, []
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        note("pre-flight skipped under DeepSpeed / FSDP (sharded parameters); run gradflow.probe(trainer) on one "
             "process instead")
        return None, []
    try:
        with kept_rng():
            batch = to_device(first_batch(loader), model_device(model))
            report = preflight(model, batch, optimizer=kwargs.get("optimizer"), trainable=trainable)["after"]
    except GradflowError:
        raise  # a trainable regex that names no parameter, an empty dataset: the user's to fix
    except Exception as exc:  # a probe that fails must not stop a run that may be healthy
        first = (str(exc).splitlines() or [""])[0]
        note(f"pre-flight probe failed ({type(exc).__name__}: {first}); training goes on without it")
        return None, []
    loss = report.snapshot.loss if report.snapshot is not None else None
    findings = report.findings
    if loss is not None and loss.error_phase == "loss":
        # the model computes no loss from this batch (a Trainer subclass's own compute_loss): not a fault
        findings = [f for f in findings if f.slug != "step-raised"]
        note("pre-flight: the model returns no loss for the first batch (custom compute_loss?); the checks that "
             "need a backward did not run")
    return report, findings
