"""Display-only advice for the coverage findings (issue 18): a requires_grad flag switched off during the step,
every gradient exactly zero, and the fallback for gradients no rule explains. Same rows as advice.py."""

from __future__ import annotations

from gradflow.fixes._base import where_defined
from gradflow.fixes.advice import Advice, as_fix


def _flip(ctx, finding):
    snippet = [f"# {finding.slug}: {finding.fix.title if finding.fix else ''}"]
    site = None
    if "set_adapter" in finding.message and ctx.loss_fn is not None:
        site = f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')} at {where_defined(ctx.loss_fn) or '?'}"
        snippet.append("# model.set_adapter(...) belongs before training starts, not inside the loss")
    elif finding.location is not None and "hook" in finding.message:
        try:
            module = ctx.model.get_submodule(finding.location)
        except AttributeError:
            module = None
        hooks = [h for d in ("_forward_pre_hooks", "_forward_hooks") for h in getattr(module, d, {}).values()]
        named = [f"{getattr(h, '__qualname__', type(h).__name__)} at {where_defined(h) or '?'}" for h in hooks]
        if named:
            site = f"the hook {named[0]} on {finding.location}"
            snippet.append(f"# remove it: model.get_submodule({finding.location!r})._forward_pre_hooks / "
                           "_forward_hooks, or the handle's .remove()")
    elif ctx.loss_fn is not None:
        site = f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')} at {where_defined(ctx.loss_fn) or '?'}"
    where = site or (f"the forward of {finding.location}" if finding.location else "the forward or the loss")
    return (f"in {where}: do not switch requires_grad (or the active adapter) during the step",
            "a flag switched off in the step drops those parameters from the graph, and keeps them frozen after it",
            snippet)


def _all_zero(ctx, finding):
    where = (f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')} at {where_defined(ctx.loss_fn) or '?'}"
             if ctx.loss_fn is not None else "the loss")
    return (f"in {where}: check the loss weights and masks (an integer zeros_like truncates 0.5 to 0)",
            "a loss that does not vary with the parameters trains nothing",
            [f"# {finding.slug}: float weights, e.g. torch.zeros_like(input_ids, dtype=torch.float)"])


def _unexplained(ctx, finding):
    return (f"check how {finding.location or 'these parameters'} reach the loss ({len(finding.params)} parameters "
            "without a gradient); please report the case to gradflow",
            "gradflow could not name the cause, so it changes nothing",
            [f"# {finding.slug}: {finding.message}"])


ADVICE = (
    Advice("keep-requires-grad", "Set requires_grad before training, not during the step", ("requires-grad-changed",),
           "Names where the flag went off: the hook and its file and line, set_adapter in the loss function, or the "
           "forward.",
           "The call that switches the flag is your code; removing it is a one-line change there.", _flip),
    Advice("nonzero-loss-weights", "Make the loss depend on the parameters", ("grad-all-zero",),
           "Points at the loss when every gradient is exactly zero: weights or a mask that are all zero, a loss "
           "multiplied by zero.",
           "The loss, its weights and its masks are your code.", _all_zero, per_location=False),
    Advice("report-unexplained", "Check how these parameters reach the loss", ("grad-missing-unexplained",),
           "Lists the trainable parameters without a gradient that no other finding explains.",
           "gradflow does not know the cause, so it cannot know a fix.", _unexplained, per_location=False),
)

FIXES = tuple(as_fix(row) for row in ADVICE)
