"""## What it does
Raised by `GradFlowCallback` during training: at step k (`--moved-at`), adapter weights are bit-identical to
their values at the start of the run, although they receive gradients.

## Why is this bad?
The optimizer is not updating them: they are missing from its parameter groups, the learning rate is zero or
scheduled to zero, or AMP skips every step because of inf/NaN gradients. The loss may still move through other
parameters, so nothing else tells you.

## Example
```python
opt = torch.optim.AdamW(base_model.parameters())    # built before get_peft_model
trainer = Trainer(model, args, optimizers=(opt, None), callbacks=[GradFlowCallback(moved_at=10)])
```

## Fix safety
Display-only: rebuild the optimizer after the model is final, and check the learning-rate schedule.
"""

from __future__ import annotations

from gradflow.rules._base import Rule

RULE = Rule(
    code="GF402", slug="adapter-not-updated", severity="error",
    fix_title="Check that the optimizer holds the adapter parameters and that the learning rate is not zero",
    applicability="display-only", check=None, doc=__doc__, runtime=True,
)
