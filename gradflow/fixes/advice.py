"""Display-only advice: one table, a row per cause in the user's own code that gradflow names but does not rewrite.

Each row becomes a `Fix` (display-only) whose plan says where to edit, why, and the line to paste. The fixes that
change the model (safe / unsafe) keep a file each.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gradflow.fixes._base import Applicability, Fix, Plan, ancestors, describe_module, where_defined
from gradflow.rules.graph_break import STE_FIX


@dataclasses.dataclass(frozen=True)
class Advice:
    """One row: the fix's id and title, the findings it answers, and how it words the change."""

    id: str
    title: str
    answers: tuple[str, ...]
    what: str  # the doc's "What it does"
    why_fix: str  # the doc's "Why this fix"
    say: Callable  # say(ctx, finding) -> (change, why, snippet lines)
    per_location: bool = True  # one plan per location (else one per finding slug)

    def doc(self) -> str:
        safety = Applicability.DISPLAY_ONLY.value.capitalize()  # the applicability every row's Fix declares
        return f"## What it does\n{self.what}\n\n## Why this fix\n{self.why_fix}\n\n## Fix safety\n{safety}.\n"


def _where(ctx, finding) -> str:
    return describe_module(ctx.model, finding.location) if finding.location is not None else "the model"


def _loss(ctx, finding):
    if ctx.loss_fn is not None:
        where = f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')}".rstrip()
        line = where_defined(ctx.loss_fn)
    else:
        line = where_defined(ctx.model)
        where = f"the forward of {type(ctx.model).__name__}"
    where += f" at {line}" if line else ""
    return (f"in {where}: compute the loss from the model output (out.logits / out.loss); no .detach(), .data, "
            "torch.no_grad(), requires_grad_() on the loss or '+ 0 * something'",
            "the loss must reach the model output through autograd",
            [f"# {finding.slug}: in {where}:",
             "#     loss = model(**batch).loss      # not a detached copy, not loss.requires_grad_()"])


def _graph_break(ctx, finding):
    where = _where(ctx, finding)
    decorator = ctx.snap.grad_off_forward.get(finding.location) if ctx.snap is not None else None
    zero_ops = ctx.snap.zero_derivative_ops if ctx.snap is not None else []
    if decorator is not None:  # the module's own forward turns autograd off
        change = f"in {where}: remove the @torch.{decorator}() decorator from forward"
    elif zero_ops and finding.fix is not None and finding.fix.title == STE_FIX:  # graph_break._zero_derivative
        op = zero_ops[0]
        change = (f"in {where}: give {'/'.join(zero_ops)}() a straight-through estimator, e.g. "
                  f"y = x + (torch.{op}(x) - x).detach()")
        why = "its derivative is zero: parameters before it get zero gradients"
        return change, why, [f"# {finding.slug}: {change}"]
    elif ctx.snap is not None and finding.location in ctx.snap.no_grad_modules:  # its caller runs it with autograd off
        caller = _caller(ctx, finding.location)
        change = (f"in {caller}: call {finding.location} outside torch.no_grad() / inference_mode" if caller else
                  f"call {where} outside torch.no_grad() / inference_mode")
    else:
        change = f"in {where}: remove the .detach() / .data / torch.no_grad() / inference_mode from the training path"
    return change, "parameters before the cut get no gradient", [f"# {finding.slug}: {change}"]


def _caller(ctx, name: str) -> str | None:
    """The code that called `name` under no_grad: the loss function or a Trainer's compute_loss when the trace saw
    the call come from outside the model's forward, else the nearest enclosing module that ran with autograd on."""
    if ctx.snap.no_grad_callers.get(name, "") is None:
        return f"{ctx.snap.trainer}.compute_loss" if ctx.snap.trainer else "your loss function"
    for parent in ancestors(name):
        state = ctx.module_state(parent)
        if state is not None and state.ran and state.grad_enabled:
            return describe_module(ctx.model, parent)
    return None


def _optimizer(ctx, finding):
    first = finding.params[0] if finding.params else "?"
    return (f"build the optimizer after the model is final (after this patch): {len(finding.params)} trainable "
            f"parameters are missing from it, first {first}",
            "parameters missing from the optimizer get gradients but never change",
            [f"# {finding.slug}: build the optimizer after this block:",
             "#     optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)"])


def _labels(ctx, finding):
    return ("keep the completion tokens in labels: check the loss mask, the truncation length (--seq-len) and that "
            "the assistant turn survives the chat template",
            "every label is -100, so no token is supervised",
            [f"# {finding.slug}: check the labels: (batch['labels'] != -100).sum() must be > 0"])


def _nonfinite(ctx, finding):
    where = _where(ctx, finding)
    return (f"in {where}: make the op numerically safe (eps, clamp, fp32 for that op) or lower the loss scale",
            "one non-finite gradient poisons the optimizer state",
            [f"# {finding.slug}: in {where}: add an eps / clamp, or compute that op in fp32"])


def _unused(ctx, finding):
    where = _where(ctx, finding)
    unused = ctx.snap.unused_outputs()
    if any(n in unused for n in finding.params):  # it ran; its output never reaches the loss
        named = set(finding.params)
        adapter = any(p.adapter for p in ctx.snap.params if p.name in named)
        return (f"{where} runs, but none of its outputs reaches the loss: use its output, or freeze it"
                + (" (leave it out of the adapter's target_modules)" if adapter else "")
                + f" ({len(finding.params)} trainable parameters)",
                "parameters whose output is never used cost optimizer memory and never learn",
                [f"# {finding.slug}: {where} runs, but its output never reaches the loss; freeze it:",
                 f"#     model.get_submodule({finding.location!r}).requires_grad_(False)"
                 + ("   # or exclude it from LoraConfig(target_modules=...)" if adapter else "")])
    return (f"{where} never ran in the forward: call it, freeze it, or remove it ({len(finding.params)} trainable "
            "parameters)",
            "parameters that never run cost optimizer memory and never learn",
            [f"# {finding.slug}: {where} never runs in the forward; freeze it if it should not:",
             f"#     model.get_submodule({finding.location!r}).requires_grad_(False)"])


def _step(ctx, finding):
    return (f"fix the error first: {finding.message}", "the training step raises, so nothing can train",
            [f"# {finding.slug}: {finding.message}"])


def _inference(ctx, finding):
    return ("build, load and wrap the model outside torch.inference_mode() (torch.no_grad() for evaluation), or "
            "replace each inference parameter with a fresh nn.Parameter, then build the optimizer",
            "autograd cannot record or update inference tensors",
            [f"# {finding.slug}: replace inference-mode parameters (tied weights stay tied):",
             "fresh = {}",
             "for module in model.modules():",
             "    for name, p in list(module.named_parameters(recurse=False)):",
             "        if p.is_inference():",
             "            new = fresh.setdefault(id(p), torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))",
             "            setattr(module, name, new)"])


def _ddp(ctx, finding):
    return ("use non-reentrant checkpointing where the model is wrapped for DDP, or find_unused_parameters=False",
            "DDP marks the parameters inside a reentrant checkpoint ready twice and the first backward raises",
            [f"# {finding.slug}: in TrainingArguments (or gradient_checkpointing_enable):",
             "#     gradient_checkpointing_kwargs={'use_reentrant': False}",
             "# or, when every trainable parameter is used in each step: ddp_find_unused_parameters=False"])


def _fsdp_requires_grad(ctx, finding):
    where = finding.location or "the root module"
    return (f"wrap with use_orig_params=True, or give the trainable parameters of {where} FSDP units of their own",
            "an FSDP1 flat parameter has one requires_grad; without use_orig_params wrapping refuses the mix",
            [f"# {finding.slug}: where the model is wrapped:",
             "#     FullyShardedDataParallel(model, ..., use_orig_params=True)",
             "#     # or: auto_wrap_policy=peft.utils.other.fsdp_auto_wrap_policy(model)  (adapters in own units)"])


def _fsdp_dtype(ctx, finding):
    where = finding.location or "the root module"
    return (f"give the parameters of {where} one dtype, or put the adapters in FSDP units of their own",
            "an FSDP unit holds one parameter dtype; a mixed-precision policy casts only after that check",
            [f"# {finding.slug}: before wrapping:",
             "#     model.to(torch.bfloat16)    # or load the base in fp32 and let MixedPrecision cast",
             "#     # or: auto_wrap_policy=peft.utils.other.fsdp_auto_wrap_policy(model)  (adapters in own units)"])


def _ddp_unused(ctx, finding):
    first = finding.params[0] if finding.params else "?"
    return (f"freeze the {len(finding.params)} trainable parameters the forward does not use (first {first}), or "
            "wrap with find_unused_parameters=True",
            "DDP waits for a gradient of every trainable parameter; the second step raises without one",
            [f"# {finding.slug}: before wrapping, for each unused parameter:",
             f"#     model.get_parameter({first!r}).requires_grad_(False)",
             "# or: DistributedDataParallel(model, find_unused_parameters=True)  "
             "(TrainingArguments: ddp_find_unused_parameters=True)"])


def _gc_changes(ctx, finding):
    where = _where(ctx, finding)
    return (f"in {where}: make the checkpointed forward recompute exactly what it computed (preserve_rng_state=True, "
            "no buffer or attribute updated in forward, no branch on torch.is_grad_enabled())",
            "a checkpointed region runs its forward twice; what differs the second time changes the gradients",
            [f"# {finding.slug}: in {where}:",
             "#     torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)  # preserve_rng_state defaults "
             "to True",
             "#     # move state updates (counters, EMA buffers) out of the checkpointed forward"])


def _not_updated(ctx, finding):
    first = finding.params[0] if finding.params else "?"
    return (f"{len(finding.params)} intended parameters did not change over the steps, first {first}: unfreeze "
            "them and build the optimizer (with a nonzero lr) over them",
            "a parameter the optimizer does not step never learns, whatever its gradient",
            [f"# {finding.slug}: after the model is final:",
             "#     optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)"])


def _zero_lr(ctx, finding):
    return ("give the optimizer a nonzero learning rate, and check the scheduler (warmup length, total steps, a "
            "lambda that returns 0)",
            "with lr 0 every update is zero: the run trains for hours and nothing moves",
            [f"# {finding.slug}: print the lr the steps use:",
             "#     print([g['lr'] for g in optimizer.param_groups], scheduler.get_last_lr())"])


def _packed_leak(ctx, finding):
    return ("keep the sample boundaries in packed batches: no attention_mask (position_ids restart per sample), "
            "use_cache=False for training, and an attention implementation that reads position_ids",
            "when attention crosses samples, each sample trains with unrelated text as context",
            [f"# {finding.slug}:",
             "model.config.use_cache = False          # a cache turns transformers' packed-sequence mask off",
             "batch.pop('attention_mask', None)       # position_ids carry the boundaries"])


def _loss_term(ctx, finding):
    terms = ctx.snap.loss_terms if ctx.snap is not None else []
    term = terms[0] if terms else None
    at = f" at {term.computed_at}" if term is not None and term.computed_at else ""
    change = (f"compute the term{at} with autograd on, from the model output itself: keep only the teacher (or what "
              "must stay constant) under torch.no_grad(), and no .detach() / .data on what the term is computed from")
    return (change, "a term without a gradient changes the loss value and adds nothing to the gradients",
            [f"# {finding.slug}:{at}",
             "with torch.no_grad():",
             "    teacher_logits = teacher(**batch).logits              # constant: fine under no_grad",
             "kd = F.kl_div(F.log_softmax(out.logits, -1), F.softmax(teacher_logits, -1), reduction='batchmean')",
             "loss = out.loss + alpha * kd                               # kd now has a gradient"])


def _loss_fn_site(ctx) -> str:
    return f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')} at {where_defined(ctx.loss_fn) or '?'}"


# the coverage findings (every trainable tensor without a gradient named): a flag switched off during the step,
# every gradient exactly zero, and the fallback
def _flip(ctx, finding):
    snippet = [f"# {finding.slug}: {finding.fix.title if finding.fix else ''}"]
    site = None
    if "set_adapter" in finding.message and ctx.loss_fn is not None:
        site = _loss_fn_site(ctx)
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
        site = _loss_fn_site(ctx)
    where = site or (f"the forward of {finding.location}" if finding.location else "the forward or the loss")
    return (f"in {where}: do not switch requires_grad (or the active adapter) during the step",
            "a flag switched off in the step drops those parameters from the graph, and keeps them frozen after it",
            snippet)


def _all_zero(ctx, finding):
    where = _loss_fn_site(ctx) if ctx.loss_fn is not None else "the loss"
    return (f"in {where}: check the loss weights and masks (an integer zeros_like truncates 0.5 to 0)",
            "a loss that does not vary with the parameters trains nothing",
            [f"# {finding.slug}: float weights, e.g. torch.zeros_like(input_ids, dtype=torch.float)"])


def _unexplained(ctx, finding):
    return (f"check how {finding.location or 'these parameters'} reach the loss ({len(finding.params)} parameters "
            "without a gradient); please report the case to gradflow",
            "gradflow could not name the cause, so it changes nothing",
            [f"# {finding.slug}: {finding.message}"])


ADVICE: tuple[Advice, ...] = (
    Advice("loss-from-output", "Compute the loss from the model output", ("loss-detached",),
           "Shows where the loss is computed when it does not depend on the model output (a detached or recomputed "
           "loss, a leaf with requires_grad set by hand, or a zero added so that backward stops raising).",
           "Only your code can compute the loss from the model output; gradflow does not rewrite it.",
           _loss, per_location=False),
    Advice("remove-graph-break", "Remove the graph break from the forward", ("graph-break",),
           "Names the module (and the file and line of its forward) where the autograd graph is cut: `.detach()`, "
           "`.data`, `torch.no_grad()`, inference mode or a non-differentiable op.",
           "The cut is in code gradflow does not rewrite; removing it is a one-line change there.", _graph_break),
    Advice("rebuild-optimizer", "Build the optimizer after the model is final", ("param-not-in-optimizer",),
           "Shows how to build the optimizer so that it holds every trainable parameter.",
           "The optimizer is yours: built before `get_peft_model`, before an unfreeze or before patch, it misses "
           "parameters, which then get gradients and never change.", _optimizer, per_location=False),
    Advice("supervise-tokens", "Keep the completion tokens in the labels", ("no-supervised-tokens",),
           "Points at the labels when every label of the batch is -100.",
           "With nothing supervised the loss is NaN or zero and nothing learns; the cause is the data (a mask that "
           "covers the completion, a sequence length that truncates it, a chat template without the assistant "
           "turn).", _labels, per_location=False),
    Advice("numerically-safe-op", "Make the named module numerically safe", ("nonfinite-grad",),
           "Names the module (and the file and line of its forward) where NaN/Inf first appear.",
           "The arithmetic is yours: an eps, a clamp, or fp32 for the unstable op fixes it at the source.", _nonfinite),
    Advice("unused-params", "Call, freeze or remove modules the forward never runs", ("trainable-param-unused",),
           "Names the modules whose trainable parameters took no part in the forward (a stale reference to a module "
           "PEFT replaced, a head never called, a branch behind a flag).",
           "Whether to call, freeze or remove the module is your decision.", _unused),
    Advice("fix-step-error", "Fix the error the step raises", ("step-raised",),
           "Points at the exception when the forward, the loss or the backward raised, with the message that names "
           "it.",
           "No gradient can be checked, let alone fixed, until one step runs; the error is in the model code, the "
           "batch or the loss function, which only you can change.", _step, per_location=False),
    Advice("rebuild-inference-params", "Build the model outside inference mode", ("inference-tensor-params",),
           "Shows how to replace parameters made under `torch.inference_mode()` with ordinary ones.",
           "Where the model was built or loaded is your code; an optimizer made before the replacement still holds "
           "the old parameters.", _inference, per_location=False),
    Advice("ddp-non-reentrant", "Use non-reentrant checkpointing under DDP", ("ddp-reentrant-checkpoint",),
           "Shows the checkpointing and DDP options that let reentrant regions and `find_unused_parameters` "
           "coexist.",
           "Both are set where the model is wrapped (TrainingArguments, or your DDP call), which gradflow does not "
           "own.", _ddp, per_location=False),
    Advice("fsdp-orig-params", "Keep original parameters in FSDP units that mix frozen and trainable ones",
           ("fsdp-mixed-requires-grad",),
           "Shows `use_orig_params=True` and a wrap policy that puts the adapters in units of their own.",
           "The FSDP options are set where the model is wrapped, which gradflow does not own.",
           _fsdp_requires_grad, per_location=False),
    Advice("fsdp-uniform-dtype", "Give each FSDP unit one parameter dtype", ("fsdp-mixed-dtype",),
           "Shows how to cast the model to one dtype before wrapping, or put the adapters in units of their own.",
           "The dtypes are set where the model is loaded, the units where it is wrapped: your code.", _fsdp_dtype,
           per_location=False),
    Advice("ddp-freeze-unused", "Freeze the parameters DDP would wait for", ("ddp-unused-parameters",),
           "Names the trainable parameters that got no gradient and shows how to freeze them, or to let DDP find "
           "them with find_unused_parameters=True.",
           "Which parameters train and how DDP wraps the model is your training code.", _ddp_unused,
           per_location=False),
    Advice("deterministic-checkpoint", "Make the checkpointed forward deterministic",
           ("checkpoint-changes-gradients",),
           "Names the first module whose gradients differ with checkpointing on and off, and what makes a "
           "recomputed forward differ (RNG state not preserved, state mutated in forward, grad-mode branches).",
           "The forward is your code (or a custom checkpoint call); only it can recompute what it computed.",
           _gc_changes, per_location=False),
    Advice("step-intended-params", "Step an optimizer that holds the intended parameters", ("param-not-updated",),
           "Lists the intended parameters that did not change over `--steps K` real optimizer steps, and how to "
           "build an optimizer that moves them.",
           "The optimizer and the freezing are set up in your training code.", _not_updated, per_location=False),
    Advice("nonzero-learning-rate", "Give the optimizer a nonzero learning rate", ("zero-learning-rate",),
           "Points at the learning rate and the scheduler when every step ran with lr 0.",
           "The learning rate and the schedule are your training arguments.", _zero_lr, per_location=False),
    Advice("keep-packed-boundaries", "Keep sample boundaries in packed batches", ("packed-attention-leak",),
           "Shows the three settings that keep attention inside each packed sample: no attention_mask, no KV "
           "cache in training, an attention implementation that reads position_ids.",
           "The collator, the config and the attention implementation are your setup.", _packed_leak,
           per_location=False),
    # the loss term without a gradient, and the coverage findings (every trainable tensor without a gradient named)
    Advice("term-with-grad", "Compute the loss term with autograd on", ("loss-term-no-grad",),
           "Shows where the loss term that has no gradient was computed (under torch.no_grad(), from .detach() or "
           ".data) and how to compute it so that it trains.",
           "The loss is your code; only it can compute the term from the model output with autograd on.",
           _loss_term, per_location=False),
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


def _fix(row: Advice) -> Fix:
    def plan(ctx, finding):
        change, why, snippet = row.say(ctx, finding)
        key = f"advice:{finding.slug}" + (f":{finding.location}" if row.per_location else "")
        return Plan(fix=fix, data={}, answers=[finding.slug], location=finding.location,
                    applicability=Applicability.DISPLAY_ONLY, key=key, changes=[change], why=why,
                    snippet_lines=snippet)

    fix = Fix(id=row.id, title=row.title, applicability=Applicability.DISPLAY_ONLY, answers=row.answers, plan=plan,
              doc=row.doc())
    return fix


FIXES: tuple[Fix, ...] = tuple(_fix(row) for row in ADVICE)
