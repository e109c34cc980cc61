"""## What it does
Raised by `GradFlowCallback` during training: at step k (`GradFlowCallback(moved_at_step=k)`; `gradflow train
--moved-at k`), trainable weights (the adapters) are bit-identical to their values at the start of the run.

## Why is this bad?
The optimizer is not updating them: they are missing from its parameter groups, the learning rate is zero or
scheduled to zero, or AMP skips every step because of inf/NaN gradients. The loss may still move through other
parameters, so nothing else tells you.

## Example
```python
opt = torch.optim.AdamW(base_model.parameters())    # built before get_peft_model
trainer = Trainer(model, args, optimizers=(opt, None), callbacks=[GradFlowCallback(moved_at_step=10)])
```
The callback's pre-flight (on by default) already reports this optimizer as `param-not-in-optimizer` before the
first step; GF402 catches what only shows while training (a zero learning rate, AMP skipping every step).
With `GradFlowCallback(raise_on_error=True)`, `trainer.train()` raises `GradflowError` instead of stopping.

## Fix safety
Display-only: rebuild the optimizer after the model is final, and check the learning-rate schedule.
"""

from __future__ import annotations

from gradflow.rules._base import Rule

RULE = Rule(
    code="GF402", slug="adapter-not-updated", severity="error",
    fix_title="Check that the optimizer holds the adapter parameters and that the learning rate is not zero",
    check=None, doc=__doc__, runtime=True,
)
