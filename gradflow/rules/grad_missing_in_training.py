"""## What it does
Raised by `GradFlowCallback` during training: at a check step (the first, then every `check_every` steps;
`gradflow train --check-every N`), trainable parameters that should learn got no gradient (`None`).

## Why is this bad?
Those parameters will never move. When the pre-flight probe (on by default) already named the cause before the
first step, such as `reentrant-checkpoint-no-input-grad`, this finding confirms it in the real step. Otherwise
something changed after the pre-flight: a hook was removed, checkpointing was switched mid-run, a custom
collator sends `inputs_embeds`, or a branch of the model stops running. The run would go on for hours while
those parameters never move, so the callback stops it with this finding, and with `diagnose=True` (the default)
it probes the last batch to name the cause. With `raise_on_error=True`, `trainer.train()` raises
`GradflowError` instead. Parameters another finding already explains are left out: those whose `requires_grad`
went off in the step (`requires-grad-changed`) and those a pre-flight warning named (`trainable-param-unused`).

## Example
```python
trainer = Trainer(model, args, callbacks=[GradFlowCallback(check_every=50)])
# step 200: model.disable_input_require_grads() somewhere in user code -> GF401, the run stops
```
Run `gradflow probe-backward` on the setup as it is at that step to see where the gradient stops.

## Fix safety
Display-only: the change happened in your training code; the callback names the step and the parameters.
"""

from __future__ import annotations

from gradflow.rules._base import Rule

RULE = Rule(
    code="GF401", slug="grad-missing-in-training", severity="error",
    fix_title="Run 'gradflow probe-backward' on this setup to see where the gradient stops",
    check=None, doc=__doc__, runtime=True,
)
