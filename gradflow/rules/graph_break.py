"""## What it does
Finds the module where the autograd graph is cut: its output does not depend on its input or parameters through
autograd (`.detach()`, `.data`, `torch.no_grad()`, inference mode, a non-differentiable op), so trainable
parameters before it get no gradient; or reaches them only through an op whose derivative is zero (`round`,
`floor`, `ceil`, `trunc`, `sign`: fake quantization without a straight-through estimator), so they get exactly-zero
gradients. `location` names the module. The cut may be partial: a residual block that
detaches only its branch still passes gradient through the residual, so only the parameters inside the branch
are lost; the probe follows each lost parameter's autograd path to find the module where it ends. A module whose
forward is decorated with `@torch.no_grad()` is named itself; a module called inside `with torch.no_grad():` is
named, with the code that switched autograd off: the caller's forward, or the loss function (a Trainer's
`compute_loss`) when it called the module (the embeddings, the encoder) outside the model's forward.

## Why is this bad?
Everything upstream of the cut stops learning. When something after the cut is still trainable the run goes on
without any error, and only those later parameters move.

## Example
```python
class Adapter(nn.Module):
    def forward(self, x):
        return self.proj(x).detach()        # cut: self.proj and everything before get no gradient

class Block(nn.Module):
    def forward(self, x):
        return x + self.proj(x).data        # partial cut: silent, only self.proj stops learning

class Smoother(nn.Module):
    @torch.no_grad()                        # cut: everything before it gets no gradient
    def forward(self, x):
        return self.norm(x)

class FakeQuant(nn.Module):
    def forward(self, x):
        return torch.round(x * 16) / 16     # zero derivative: everything before it gets a zero gradient
        # fix: x + (torch.round(x * 16) / 16 - x).detach()
```
Remove the `.detach()` / `.data` / `no_grad` from the training path; give a zero-derivative op a straight-through
estimator.

## Fix safety
Display-only: the cut is in your code; gradflow names the module and does not rewrite it.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, layer_span, plural, short, under
from gradflow.snapshot import ancestors


def lost_params(snap):
    """Trainable params without a gradient that ran outside a reentrant no-grad region, not explained elsewhere."""
    return snap.without_grad() if snap.probed else []


def check(snap):
    # one finding per cut, until every lost parameter is explained: two layers each wrapped in its own no_grad
    # are two cuts (one no_grad block around both is one, named as a scope)
    findings, lost = [], lost_params(snap)
    while lost:
        found = _explain(_Lost(snap, lost))
        covered = set(found.params or ()) if found is not None else set()
        if not covered & {p.name for p in lost}:
            break
        findings.append(found)
        lost = [p for p in lost if p.name not in covered]
    return findings


def _explain(ctx):
    # the most specific explanation first: a forward decorated to turn autograd off, a call under no_grad, the cut
    # the probe's autograd walk found, and, without that walk, the first module whose output lost requires_grad
    for explain in (_decorated_forward, _called_without_autograd, _traced_cut, _detached_output):
        found = explain(ctx)
        if found is not None:
            return found
    return None


class _Lost:
    """The trainable parameters without a gradient, and where the probe saw each cut."""

    def __init__(self, snap, lost):
        self.snap, self.lost = snap, lost
        self.modules = {m.name: m for m in snap.modules}
        self.names = [p.name for p in lost]
        # the module each lost parameter was cut at (the probe's autograd walk), and the module it sits in
        self.cut_at = {n: m.name for m in snap.modules for n in m.cut_params}
        self.owner = {p.name: p.module for p in lost}

    def cut_by(self, name: str) -> list[str]:
        """Lost parameters inside `name`, or whose gradient path ends in it or in a module run inside it."""
        return [n for n in self.names
                if under(self.owner[n], name) or (n in self.cut_at and under(self.cut_at[n], name))]


def _decorated_forward(ctx: _Lost):
    """A forward that turns autograd off itself (@torch.no_grad()): its hooks saw autograd on, so name it, not the
    modules it ran."""
    decorated, modules = ctx.snap.grad_off_forward, ctx.modules
    for m in sorted((modules[n] for n in decorated if n in modules and modules[n].order is not None),
                    key=lambda m: m.order):
        cut = ctx.cut_by(m.name)
        if cut:
            message = (f"the forward of {m.name or 'the model'} ({m.cls}) runs under @torch.{decorated[m.name]}(): "
                       f"its output does not depend on {_where(cut, m.name, ctx.snap)}; "
                       f"{_lose(cut)}")
            return RULE.finding(message, location=m.name or None, params=cut)
    return None


def _called_without_autograd(ctx: _Lost):
    """A module called with autograd off (torch.no_grad / inference_mode around the call)."""
    modules = ctx.modules
    roots = sorted((modules[n] for n in ctx.snap.no_grad_modules if n in modules),
                   key=lambda m: (m.order if m.order is not None else 1 << 30, m.depth))
    for m in roots:
        cut = ctx.cut_by(m.name)
        if not cut:
            continue
        # the code that switched autograd off: the module whose forward made the call, or the loss computation
        parent = _caller(m.name, ctx.snap, modules)
        # the whole scope: siblings the same caller ran without autograd (a no_grad block around layers 0-1)
        scope = [r for r in roots
                 if r.name != m.name and _caller(r.name, ctx.snap, modules) is parent and ctx.cut_by(r.name)]
        for other in scope:
            cut += [n for n in ctx.cut_by(other.name) if n not in cut]
        names = [m.name] + [r.name for r in scope]
        held = "it holds trainable parameters" if any(under(ctx.owner[n], x) for n in cut for x in names) else (
            "its input carries gradient from trainable parameters before it")
        what = f"{m.name or 'the model'} ({m.cls})" if not scope else (
            f"{layer_span(names)} ({plural(len(names), 'module')}, from {m.name})")
        message = (f"{what} ran with autograd off ({_switched_off(parent, m.name, ctx.snap, bool(scope))}) although "
                   f"{held.replace('it holds', 'they hold') if scope else held}; {_lose(cut)}")
        return RULE.finding(message, location=m.name or None, params=cut)
    return None


_OUTSIDE = "outside"  # the caller of a module called from the loss computation, not from a module's forward


def _caller(name: str, snap, modules):
    """The module whose forward called `name` with autograd off, or _OUTSIDE for the loss computation."""
    if name in snap.no_grad_callers:  # what the trace saw at the call
        by = snap.no_grad_callers[name]
        return _OUTSIDE if by is None else modules.get(by)
    # without it: the nearest ancestor that ran (a ModuleList never does)
    return next((modules[a] for a in list(ancestors(name))[1:] if a in modules and modules[a].ran), None)


def _switched_off(parent, name: str, snap, several: bool) -> str:
    """Where autograd was off, for the message: in a module's forward, or in the loss computation that called it."""
    if parent is _OUTSIDE:
        site = f"{snap.trainer}.compute_loss" if snap.trainer else "the loss function"
        outside = ", outside the model's forward" if name else ""
        return f"torch.no_grad / inference mode was on when {site} called {'them' if several else 'it'}{outside}"
    if parent is not None and parent.grad_enabled:
        return f"torch.no_grad / inference mode, switched off inside {parent.name or 'the model'} ({parent.cls})"
    return "torch.no_grad / inference mode"


def _lose(cut: list[str], upstream: str = "") -> str:
    """'N trainable parameters get no gradient: a, b and k more', in agreement with N."""
    verb = "gets" if len(cut) == 1 else "get"
    return f"{plural(len(cut), 'trainable parameter')}{upstream} {verb} no gradient: {short(cut, 2)}"


def _traced_cut(ctx: _Lost):
    """The probe traced each lost parameter's autograd path to the first module whose outputs no longer reach it."""
    lost = set(ctx.names)
    for m in sorted((m for m in ctx.snap.modules if m.cut_params and m.order is not None), key=lambda m: m.order):
        cut = [n for n in m.cut_params if n in lost]
        if not cut:
            continue
        zeroed = _zero_derivative(cut, m, ctx.snap)
        if zeroed is not None:
            return zeroed
        if m.out_requires_grad:
            how = (f"its output still requires grad, but not through {plural(len(cut), 'trainable parameter')} "
                   f"{'inside it' if all(_inside(n, m.name, ctx.snap) for n in cut) else 'before it'}")
            causes = ".detach(), .data, an integer cast, a comparison, or torch.no_grad() around part of it"
        else:
            how = "its output does not require grad"
            causes = ".detach(), .data, torch.no_grad(), an integer cast or a comparison"
        message = f"the graph is cut in {m.name or 'the model'} ({m.cls}): {how} ({causes}); {_lose(cut)}"
        return RULE.finding(message, location=m.name or None, params=cut)
    return None


STE_FIX = ("Give the op a straight-through estimator: x + (op(x) - x).detach() passes the gradient as if it were "
            "the identity")


def _zero_derivative(cut: list[str], m, snap):
    """Cut params whose gradient is exactly zero, not None: the graph reaches them only through an op whose
    derivative is zero (round, sign ...: fake quantization or binarisation without a straight-through estimator)."""
    grads = {p.name: p.grad for p in snap.params}
    if not snap.zero_derivative_ops or any(grads.get(n) != "zero" for n in cut):
        return None
    ops = " / ".join(f"{op}()" for op in snap.zero_derivative_ops)
    where = "inside it" if all(_inside(n, m.name, snap) for n in cut) else "before it"
    verb = "gets" if len(cut) == 1 else "get"
    message = (f"the gradient is zeroed in {m.name or 'the model'} ({m.cls}): its output reaches the trainable "
               f"parameters {where} only through {ops}, whose derivative is zero (no straight-through estimator); "
               f"{plural(len(cut), 'trainable parameter')} {verb} an exactly-zero gradient: {short(cut, 2)}")
    return RULE.finding(message, location=m.name or None, params=cut, fix_title=STE_FIX)


def _detached_output(ctx: _Lost):
    """Without the autograd walk: children finish before their parents, so forward-completion order puts the
    innermost module whose output lost requires_grad first."""
    modules = ctx.modules
    for m in sorted((m for m in ctx.snap.modules if m.detached_output and m.order is not None),
                    key=lambda m: m.order):
        cut = [p.name for p in ctx.lost if (modules.get(p.module) and modules[p.module].order is not None
                                            and modules[p.module].order <= m.order)]
        if not cut:
            continue
        message = (f"the output of {m.name} ({m.cls}) does not require grad although its "
                   f"{'input does' if m.in_requires_grad else 'parameters do'}: the graph is cut there "
                   f"(.detach(), .data, torch.no_grad() or a non-differentiable op); {_lose(cut, ' upstream')}")
        return RULE.finding(message, location=m.name, params=cut)
    return None


def _where(cut: list[str], module: str, snap) -> str:
    inside = sum(_inside(n, module, snap) for n in cut)
    if inside == len(cut):
        return "the trainable parameters inside it"
    return "its input, which carries gradient from trainable parameters before it" if not inside else (
        "its input or the trainable parameters inside it")


def _inside(param: str, module: str, snap) -> bool:
    state = next((p for p in snap.params if p.name == param), None)
    return state is not None and under(state.module, module)


RULE = Rule(
    code="GF120", slug="graph-break", severity="error",
    fix_title="Remove the .detach() / .data / no_grad from the training path in that module",
    check=check, doc=__doc__,
)
