"""## What it does
With `--steps K` (`gradflow.probe(..., steps=K)`), records the learning rate each of the K optimizer steps used, per
parameter group, and the one step K+1 would use. Finds groups holding trainable parameters whose learning rate is
zero at every one of those steps: `lr=0` given, or a scheduler that zeroes it (a `LambdaLR` returning 0, a linear
schedule whose `num_training_steps` came out as 0).

A warmup that starts at zero is fine: its first step has lr 0, the next ones do not. That is why the rate step K+1
would use is included: `--steps 1` on a warmup schedule stays silent.

## Why is this bad?
Nothing moves. The loss is computed, gradients flow, every gradient check passes, and the weights stay where they
started.

## Example
```python
opt = torch.optim.AdamW(params, lr=2e-4)
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=len(loader) // accum)
# len(loader) < accum: num_training_steps == 0, and the schedule is 0 from the first step
```

## Fix safety
Display-only: set a nonzero learning rate, or fix the schedule's step counts.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural


def check(snap):
    run = snap.steps
    if run is None or run.error is not None or not run.zero_lr_groups:
        return []
    held = sum(run.group_sizes[i] for i in run.zero_lr_groups)
    groups = ", ".join(str(i) for i in run.zero_lr_groups)
    by = f" (scheduler {run.scheduler})" if run.scheduler else ""
    message = (f"the learning rate of {run.optimizer} param group {groups}{by} is 0 at all {plural(run.steps, 'step')} "
               f"and the next: {plural(held, 'trainable parameter')} in it never change")
    params = [p.name for p in run.params if p.zero_lr]
    return [RULE.finding(message, location=None, params=params)]


RULE = Rule(
    code="GF142", slug="zero-learning-rate", severity="error",
    fix_title="Give the optimizer a nonzero learning rate and check the scheduler's step counts",
    check=check, doc=__doc__,
)
