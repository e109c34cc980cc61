"""The pre-flight: probe the setup on a batch shaped as training will shape it (packed when packing is on, so that
`packed-attention-leak` is checked), patch what it finds, and re-probe."""

from __future__ import annotations

import os

import gradflow
from gradflow.errors import GradflowError
from gradflow.fixes.recipe_file import apply_recipe as apply_saved, load_recipe


def apply_recipe(setup, path: str, batch=None) -> list:
    if not os.path.exists(path):
        raise GradflowError(f"--recipe {path} does not exist", "Pass the directory written by 'gradflow patch --save'")
    recipe = load_recipe(path)
    return list(apply_saved(setup.model, recipe, batch) or [])


def preflight(setup, batch, *, unsafe: bool = False, say=None) -> dict:
    """Probe, patch (patch re-probes). Returns the three reports."""
    say = say or (lambda text: None)
    before = gradflow.probe(setup.model, batch, loss_fn=setup.loss_fn, optimizer=None, trainable=setup.trainable)
    patched = None
    if any(f.severity in ("error", "warning") for f in before.findings):
        say("pre-flight: patching")
        patched = gradflow.patch(setup.model, batch, loss_fn=setup.loss_fn, trainable=setup.trainable,
                                 unsafe=unsafe)
    # patch ends with its own re-probe of the patched model: that is the "probe again", no fourth pass
    after = patched.after if patched is not None else before
    return {"before": before, "patch": patched, "after": after, "patch_available": True}


