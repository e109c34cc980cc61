"""## What it does
Fires when the training step itself raises: the forward, the loss extraction (no loss, a non-scalar loss) or
the backward; with `--steps K`, also when one of those K steps raises (its optimizer step included) while the
probe's own step did not. Each step gets its own copy of the batch, as a dataloader gives it. The exception is recorded as data in the report (`loss.error`, `loss.error_phase`); a more
specific finding (such as `nested-checkpoint`) replaces this one when it explains the error.

## Why is this bad?
A setup whose step raises cannot train at all. As a pre-flight check in CI this must fail the run, not pass it
because no gradient rule had anything to look at.

## Example
```python
def loss_fn(model, batch):
    return model(**batch).logits          # a [batch, seq, vocab] tensor, not a scalar loss
```
Return a scalar loss (`.loss`, or reduce with `.mean()`), or fix the error the message names.

## Fix safety
Display-only: the failing code is yours.
"""

from __future__ import annotations

from gradflow.rules._base import Rule


_PHASES = {"forward": "the forward", "loss": "reading the loss", "backward": "the backward",
           "optimizer": "the optimizer step"}


def check(snap):
    loss = snap.loss
    if loss is not None and loss.error is not None:
        return [RULE.finding(f"{_PHASES.get(loss.error_phase, 'the step')} raised {loss.error}", location=None)]
    run = snap.steps
    if run is None or run.error is None:
        return []
    # the probe's step went through; one of the --steps K did not (each gets its own copy of the batch)
    at = f"step {run.error_step} of {run.steps}" if run.error_step else f"one of {run.steps} steps"
    return [RULE.finding(f"{_PHASES.get(run.error_phase, 'the step')} of {at} (--steps, {run.optimizer}) raised "
                         f"{run.error}", location=None)]


RULE = Rule(
    code="GF150", slug="step-raised", severity="error",
    fix_title="Fix the error in the forward / loss / backward named in the message",
    check=check, doc=__doc__, superseded_by=("nested-checkpoint", "inference-tensor-params", "ddp-reentrant-checkpoint"),
)
