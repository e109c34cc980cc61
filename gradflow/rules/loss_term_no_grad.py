"""## What it does
Fires when a term added to the loss was computed from the model's outputs without a gradient: under
`torch.no_grad()` / `inference_mode`, from a `.detach()`ed copy or from `.data`. gradflow watches the loss
computation (a `loss_fn`, a Trainer's `compute_loss`): the outputs of every module call there (the model, a
teacher) and everything computed from them are followed, and the walk from the loss down through the arithmetic
that combines terms (`+`, `-`, `*`, `/`, `mean`, `sum`, `stack`) finds an added operand that is such a tensor. It
names where the term lost its gradient and where it was added, when the trace can tell.

Constants stay silent: a scalar weight, loss scaling, the division by `num_items_in_batch` (computed from the
labels, not from an output), label smoothing. So does a detached factor that multiplies the loss (a focal weight, a
stop-gradient importance weight): gradients still flow through the other factor.

## Why is this bad?
The term changes the loss value that is logged, and adds nothing to the gradients: a distillation or auxiliary
objective computed this way never trains anything, while the run looks healthy.

## Example
```python
out = model(**batch)
with torch.no_grad():
    teacher_logits = teacher(**batch).logits
    kd = F.kl_div(F.log_softmax(out.logits, -1), F.softmax(teacher_logits, -1), reduction="batchmean")
loss = out.loss + 0.5 * kd        # kd has no gradient: the student never learns from the teacher
```
Run only the teacher under `torch.no_grad()`, and compute the term from the student's output with autograd on:
```python
with torch.no_grad():
    teacher_logits = teacher(**batch).logits
kd = F.kl_div(F.log_softmax(out.logits, -1), F.softmax(teacher_logits, -1), reduction="batchmean")
```

## Fix safety
Display-only: the loss is your code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural


def check(snap):
    terms = snap.loss_terms
    if not terms or snap.loss is None or snap.loss.error is not None:
        return []
    first = terms[0]
    added = f" added at {first.added_at}" if first.added_at else ""
    computed = f" (at {first.computed_at})" if first.computed_at else ""
    more = f"; {plural(len(terms) - 1, 'more term')} like it" if len(terms) > 1 else ""
    message = (f"a loss term{added} has no gradient: it was computed {first.how}{computed}, so it changes the loss "
               f"value and adds nothing to the gradients{more}")
    return [RULE.finding(message, location=None)]


RULE = Rule(
    code="GF124", slug="loss-term-no-grad", severity="warning",
    fix_title="Compute the term from the model output with autograd on (no torch.no_grad(), .detach() or .data), "
              "or drop it from the loss",
    check=check, doc=__doc__, superseded_by=("loss-detached",),
)
