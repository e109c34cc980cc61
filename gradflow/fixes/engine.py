"""Patch: probe, plan the fixes that answer the findings, apply them, and probe again to prove them."""

from __future__ import annotations

from typing import Any, Callable

from gradflow.fixes import all_fixes
from gradflow.fixes._base import Context, Env, Fix, Plan
from gradflow.fixes._code import WIDTH, fit_code
from gradflow.model_state import ModelState
from gradflow.finding import Applicability
from gradflow.report import Report
from gradflow.report.sections import PatchOutcome

MAX_ROUNDS = 3  # a fix can reveal the next finding (unfrozen adapters behind a cut checkpoint): probe again

_ADVICE = Fix(id="advice", title="Follow the finding's advice", applicability="display-only", answers=(),
              plan=lambda ctx, finding: None)


def run_patch(model, batch: Any, run_probe: Callable[[], Report], *, loss_fn: Callable | None = None,
              optimizer=None, trainable: str | None = None, unsafe: bool = False, dry_run: bool = False) -> Report:
    """Probe `model`, apply the fixes its findings call for, and probe again.

    Args:
        model: the nn.Module to fix in place.
        batch: the one batch both probes use (the caller synthesises it when the user gave none). A legacy
            `past_key_values` is popped from a dict batch by the cache fix.
        run_probe: probes `model` on `batch` as the user set it up (`gradflow.api.patch` passes its own probe, so
            that fixes never import the API above them).
        loss_fn, optimizer, trainable: as for `gradflow.probe`.
        unsafe: also apply fixes that change what the model learns.
        dry_run: plan only; nothing is changed.

    Returns:
        A Report for command "patch": its own fields mirror the final probe; `.before` and `.after` are the probes
        around the fixes (`.after` is None on a dry run); `.fixes_applied` lists what changed and why; `.extra`
        holds the plan (dry run), display-only advice, skipped unsafe fixes, the verification and the snippet.
    """
    def context(report):
        return Context(model=model, batch=batch, snap=report.snapshot, findings=report.findings, trainable=trainable,
                       optimizer_given=optimizer is not None, loss_fn=loss_fn, unsafe=unsafe)

    before = run_probe()
    current = before
    applied: list[tuple[Plan, dict]] = []
    applied_keys: set[str] = set()
    first_plans: list[Plan] | None = None
    state = None
    for round_no in range(1, MAX_ROUNDS + 1):
        plans = make_plans(context(current))
        if first_plans is None:
            first_plans = plans
        todo = [p for p in plans if _applies(p, unsafe) and p.key not in applied_keys]
        if dry_run or not todo:
            break
        if state is None:
            state = ModelState(model, batch=batch)
        env = Env(batch=batch)
        for p in todo:
            changed = p.fix.apply(model, p.data, env)
            applied_keys.add(p.key)
            if changed:
                applied.append((p, {**_record(p), "changed": changed, "round": round_no}))
        current = run_probe()

    rolled_back = None
    reason = _worse(before, current) if applied else None
    if reason:
        # something made it worse: start again from the original, one fix at a time, keeping those that do no harm
        state.restore()
        current, applied, dropped = _one_by_one(model, batch, applied, before, run_probe)
        rolled_back = {"reason": reason, "fixes": dropped}

    final_plans = make_plans(context(current)) if not dry_run else (first_plans or [])
    advice = [p for p in final_plans if p.applicability == "display-only"]
    skipped = [p for p in final_plans if p.applicability == "unsafe" and not unsafe]
    verification = None if dry_run else verify(current)
    records = []
    for p, rec in applied:
        remaining = [s for s in p.answers if s in current.slugs()]
        rec["verified"] = bool(verification and verification["ok"]) and not remaining
        records.append(rec)

    outcome = PatchOutcome(
        dry_run=dry_run,
        unsafe_fixes=unsafe,
        plan=[p.to_dict() for p in (first_plans or []) if dry_run and _applies(p, unsafe)],
        advice=[p.to_dict() for p in advice],
        skipped_unsafe=[p.to_dict() for p in skipped],
        verification=verification,
        rolled_back=rolled_back,
        snippet=build_snippet([p for p, _ in applied] if not dry_run else
                              [p for p in (first_plans or []) if _applies(p, unsafe)],
                              advice, skipped),
    )
    return Report(command="patch", model=current.model, loss=current.loss, params=current.params,
                  modules=current.modules, findings=current.findings, snapshot=current.snapshot, before=before,
                  after=None if dry_run else current, fixes_applied=records, patch=outcome)


def _one_by_one(model, batch, applied, before, run_probe):
    """Re-apply `applied` in order, probing after each; a fix that makes things worse is undone and dropped."""
    reference, kept, dropped = before, [], []
    for plan, rec in applied:
        state = ModelState(model, batch=batch)
        changed = plan.fix.apply(model, plan.data, Env(batch=batch))
        if not changed:
            continue
        report = run_probe()
        why = _worse(reference, report)
        if why:
            state.restore()
            dropped.append({**rec, "reason": why})
        else:
            kept.append((plan, {**rec, "changed": changed}))
            reference = report
    return reference, kept, dropped


def make_plans(ctx: Context) -> list[Plan]:
    """Ask the fixes, in catalog order, for plans answering the findings; one change per key."""
    plans: list[Plan] = []
    by_key: dict[str, Plan] = {}
    answered: set[int] = set()
    for fix in all_fixes():
        for finding in ctx.findings:
            if finding.slug not in fix.answers or id(finding) in answered:
                continue
            got = fix.plan(ctx, finding)
            if not got:
                continue
            answered.add(id(finding))
            for p in (got if isinstance(got, list) else [got]):
                same = by_key.get(p.key)
                if same is None:
                    by_key[p.key] = p
                    plans.append(p)
                    continue
                same.answers.extend(s for s in p.answers if s not in same.answers)
                # a safe request for the same change makes it safe
                same.applicability = min(same.applicability, p.applicability)
    for finding in ctx.findings:
        if id(finding) in answered or finding.severity == "info" or finding.fix is None:
            continue
        # no fix can act here: the finding's own advice, as display-only
        plans.append(Plan(fix=_ADVICE, data={}, answers=[finding.slug], location=finding.location,
                          applicability="display-only", key=f"advice:{finding.slug}:{finding.location}",
                          changes=[finding.fix.title + (f" (at {finding.location})" if finding.location else "")],
                          why=finding.message,
                          snippet_lines=[f"# {finding.slug}: {finding.fix.title}"
                                         + (f" (at {finding.location})" if finding.location else "")]))
    return plans


def _applies(plan: Plan, unsafe: bool) -> bool:
    return plan.applicability.applies(Applicability.UNSAFE if unsafe else Applicability.SAFE)


def _record(plan: Plan) -> dict:
    return {"id": plan.fix.id, "title": plan.fix.title, "applicability": plan.applicability,
            "answers": list(plan.answers), "location": plan.location, "planned": list(plan.changes),
            "why": plan.why, "data": plan.data, "code": plan.code()}


def _grad_classes(report) -> dict[str, str]:
    snap = report.snapshot
    return {p.name: p.grad for p in snap.params if p.requires_grad} if snap is not None and snap.probed else {}


def _worse(before, after) -> str | None:
    """Why the patched model is worse than the original (a new exception, lost or non-finite gradients), or None."""
    b_loss, a_loss = before.loss or {}, after.loss or {}
    if a_loss.get("error") and not b_loss.get("error"):
        return f"the patched model raised in {a_loss.get('error_phase')}: {a_loss['error']}"
    b, a = _grad_classes(before), _grad_classes(after)
    lost = [n for n, g in b.items() if g in ("ok", "zero") and a.get(n) == "none"]
    if lost:
        return f"{len(lost)} parameters lost their gradient (first {lost[0]})"
    bad = [n for n, g in a.items() if g == "nonfinite" and b.get(n) != "nonfinite"]
    if bad:
        return f"{len(bad)} parameters got non-finite gradients (first {bad[0]})"
    return None


def verify(report) -> dict:
    """Whether every intended trainable parameter receives a finite gradient (the proof a fix counts)."""
    snap = report.snapshot
    loss = snap.loss
    trainable = [p for p in snap.params if p.requires_grad]
    intended = {p.name: p for p in trainable}
    intended.update({p.name: p for p in snap.params if p.intended and not p.quantized})
    frozen = [n for n, p in intended.items() if not p.requires_grad]
    no_grad = [n for n, p in intended.items() if p.requires_grad and p.grad in ("none", None)]
    nonfinite = [n for n, p in intended.items() if p.requires_grad and p.grad == "nonfinite"]
    loss_ok = loss is not None and loss.error is None and loss.grad_fn is not None
    receiving = len(intended) - len(frozen) - len(no_grad) - len(nonfinite)
    ok = bool(intended) and loss_ok and not (frozen or no_grad or nonfinite)
    return {"ok": ok, "intended": len(intended), "receiving": receiving, "loss_grad_fn": loss.grad_fn if loss else None,
            "loss_error": loss.error if loss else None, "frozen": frozen[:20], "no_grad": no_grad[:20],
            "nonfinite": nonfinite[:20]}


def build_snippet(applied: list[Plan], advice: list[Plan], skipped: list[Plan]) -> str:
    """Code the user can paste into their own script to make the same fixes (advice as comments)."""
    body: list[str] = []
    for p in applied:
        code = p.code()
        if code:
            body.append(f"# {', '.join(p.answers)}: {p.fix.title}")
            body.extend(code)
    for p in skipped:
        body.append(f"# unsafe, not applied (gradflow patch --unsafe-fixes): {p.fix.title}")
        body.extend("# " + line for line in fit_code(p.code(), WIDTH - 2))  # fitted first: uncommented, it runs
    for p in advice:
        body.extend(p.code())
    if not body:
        return ""
    head = ["# gradflow patch: paste after the model is built and checkpointing is set, before the optimizer.",
            "# `model` is your model object" + (", `batch` your training batch" if any("batch" in ln for ln in body)
                                                else "")
            + (", `trainer` your Trainer" if any(ln.startswith("trainer.") for ln in body) else "") + "."]
    if any("torch." in ln for ln in body if not ln.lstrip().startswith("#")):
        head.append("import torch")
    return "\n".join(fit_code(head + body)) + "\n"  # 80 columns, the same Python
