"""A `transformers.Trainer` (TRL's `SFTTrainer` included) as a source: the setup exactly as `train()` starts it.

The Trainer changes the setup inside `train()`: it turns checkpointing on from its args (reentrant by default on
transformers 4.57), wraps the model, builds the optimizer and the dataloader. Rather than re-implement that,
gradflow drives the trainer's own `train()` and stops it at `on_train_begin`, before any step: the model, the
optimizer and the first batch are then the ones the run would use. Afterwards the trainer and the model are put
back as found, so a later `trainer.train()` runs exactly as it would have: no weight, optimizer state,
checkpoint or log is changed or written.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from gradflow.errors import GradflowError
from gradflow.model_state import ModelState, kept_rng
from gradflow.models import is_peft_model
from gradflow.setup.sources import Kind, Setup, _first_line, _where
from gradflow.setup.wrappers import plan_fsdp1


class _Stop(Exception):
    """Raised at on_train_begin to end `train()` before its first step."""


class _Capture:
    """A callback placed first in the trainer's list: it takes what on_train_begin sees, then stops the run."""

    def __init__(self):
        self.seen: dict = {}

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None  # every other event: nothing
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = kwargs
        raise _Stop()  # before any other callback (TensorBoard, W&B) opens a log


def first_batch(dataloader):
    """The first batch the training loop will draw (collator included), without moving any RNG it uses."""
    sampler = getattr(dataloader, "sampler", None)
    generators = [g for g in (getattr(dataloader, "generator", None), getattr(sampler, "generator", None))
                  if g is not None]
    states = [g.get_state() for g in generators]
    # accelerate's dataloader registers itself in a shared GradientState on __iter__ and unregisters only when
    # the epoch ends: a first batch taken and dropped would leave it registered
    shared = getattr(dataloader, "gradient_state", None)
    refs = list(shared._dataloader_references_ref) if hasattr(shared, "_dataloader_references_ref") else None
    with kept_rng():
        try:
            return next(iter(dataloader))
        except StopIteration:
            raise GradflowError("the trainer's train dataset is empty: there is no first batch to probe",
                                "Pass a train_dataset with at least one sample") from None
        finally:
            for g, s in zip(generators, states):
                g.set_state(s)
            if refs is not None:
                shared._dataloader_references_ref = refs


_MISSING = object()


def _optimizer_groups(optimizer):
    """A user-given optimizer's hyper-parameters (the scheduler the Trainer builds writes lr and initial_lr)."""
    if optimizer is None:
        return None
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def find_unused_parameters(trainer, model) -> bool | None:
    """DDP's find_unused_parameters as this Trainer would set it; None when the run is not distributed.

    An explicit `ddp_find_unused_parameters=True` counts even in a single-process probe: the same script is
    launched with torchrun later. Otherwise the Trainer's default applies, only under DDP: off for a
    transformers model with checkpointing on, on for anything else (a PeftModel included, on both stacks).
    """
    args = trainer.args
    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        return True if explicit else None
    if getattr(getattr(args, "parallel_mode", None), "value", None) != "distributed":
        return None
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        checkpointing = any(getattr(model, a, False) for a in ("is_gradient_checkpointing",
                                                                 "is_activation_checkpointing"))
        return not (checkpointing or getattr(args, "gradient_checkpointing", False)
                    or getattr(args, "activation_checkpointing", False))
    return True


def fsdp1_options(args) -> dict | None:
    """The FSDP1 wrap options these TrainingArguments give accelerate; None when they ask for no FSDP1.

    transformers 5.x builds accelerate's plugin from `args.fsdp_plugin_args` (FSDP2 unless fsdp_config says
    `version: 1`; `use_orig_params` true unless fsdp_config says false). transformers 4.57 hands FSDP to accelerate
    through FSDP_* environment variables that TrainingArguments sets from `fsdp` / `fsdp_config` (the same values
    are read here from the args) and sets none for the version: accelerate then reads FSDP_VERSION, 1 by default.
    Returns {"policy": TRANSFORMER_BASED_WRAP | SIZE_BASED_WRAP | NO_WRAP, "classes": [names] or None,
    "min_num_params": int, "use_orig_params": bool}.
    """
    import os

    kwargs = getattr(args, "fsdp_plugin_args", _MISSING)
    if kwargs is not _MISSING:  # transformers 5.x
        if not kwargs or int(kwargs.get("fsdp_version") or os.environ.get("FSDP_VERSION", "1")) != 1:
            return None
        classes = kwargs.get("transformer_cls_names_to_wrap") or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        use_orig = kwargs.get("use_orig_params")
        if use_orig is None:
            use_orig = os.environ.get("FSDP_USE_ORIG_PARAMS", "false").lower() in ("1", "true", "yes", "on")
        return {"policy": str(kwargs.get("auto_wrap_policy") or os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")),
                "classes": classes.split(",") if isinstance(classes, str) else classes,
                "min_num_params": int(kwargs.get("min_num_params") or os.environ.get("FSDP_MIN_NUM_PARAMS", 0)),
                "use_orig_params": bool(use_orig)}
    options = [str(getattr(o, "value", o)) for o in (getattr(args, "fsdp", None) or [])]  # transformers 4.x
    config = getattr(args, "fsdp_config", None) or {}
    if not options or config.get("xla") or int(os.environ.get("FSDP_VERSION", "1")) != 1:
        return None
    policy, classes, min_params = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP"), None, 0
    if "auto_wrap" in options:
        min_params = int(config.get("min_num_params", 0))
        policy = "SIZE_BASED_WRAP" if min_params > 0 else "TRANSFORMER_BASED_WRAP"
        classes = None if min_params > 0 else config.get("transformer_layer_cls_to_wrap")
    return {"policy": policy, "classes": classes, "min_num_params": min_params,
            "use_orig_params": str(config.get("use_orig_params", "true")).lower() == "true"}


def fsdp1_plan(trainer, model) -> list | None:
    """The FSDP1 units `trainer.train()` will wrap `model` into when launched under torchrun, planned without
    wrapping (gradflow.setup.wrappers.plan_fsdp1); None when the trainer asks for no FSDP1, or when accelerate's FSDP
    plugin is active here (then the trainer wraps the model itself, and the wrapped model is read as it is).

    The policy is the one the Trainer passes to FullyShardedDataParallel: for a PeftModel, PEFT's
    `fsdp_auto_wrap_policy` (both stacks swap it in before wrapping: adapters become units of their own), else
    accelerate's from the args (the decoder-layer classes named in fsdp_config, else the model's
    `_no_split_modules`; a size-based policy; or none). The mixed-precision param_dtype follows bf16 / fp16.
    """
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    if getattr(state, "fsdp_plugin", None) is not None:
        return None
    options = fsdp1_options(trainer.args)
    if options is None:
        return None
    import functools

    import torch
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policy = None
    if is_peft_model(model) and _has_peft_config(model):
        from peft.utils.other import fsdp_auto_wrap_policy

        try:
            policy = fsdp_auto_wrap_policy(model)
        except TypeError as exc:  # FSDP_TRANSFORMER_CLS_TO_WRAP names a class the model lacks
            raise GradflowError(f"the trainer's FSDP settings cannot wrap {type(model).__name__}: {_first_line(exc)}",
                                "Set transformer_layer_cls_to_wrap in fsdp_config to the model's decoder-layer "
                                "class") from exc
    elif options["policy"].upper() == "TRANSFORMER_BASED_WRAP":
        from accelerate.utils.dataclasses import get_module_class_from_name

        names = options["classes"] or list(getattr(model, "_no_split_modules", None) or [])
        classes = set()
        for name in names:
            cls = get_module_class_from_name(model, name)
            if cls is None:  # accelerate raises the same when it wraps
                raise GradflowError(f"fsdp_config's transformer_layer_cls_to_wrap names {name!r}, and "
                                    f"{type(model).__name__} has no module of that class",
                                    "Name the model's decoder-layer class (e.g. LlamaDecoderLayer)")
            classes.add(cls)
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    elif options["policy"].upper() == "SIZE_BASED_WRAP" and options["min_num_params"] > 0:
        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=options["min_num_params"])
    args = trainer.args
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    return plan_fsdp1(model, auto_wrap_policy=policy, use_orig_params=options["use_orig_params"],
                      mixed_precision=MixedPrecision(param_dtype=dtype) if dtype is not None else None)


def _has_peft_config(model) -> bool:
    from peft import PeftConfig

    return isinstance(getattr(model, "active_peft_config", None), PeftConfig)


@contextlib.contextmanager
def prepared(trainer) -> Iterator[Setup]:
    """The Setup `trainer.train()` would start with; on exit the trainer and model are put back as found.

    What the trainer's own preparation changed is undone (`train()` does it again); what changed inside the
    block (a patch's fixes) stays.
    """
    model = trainer.model
    before = ModelState(model)
    saved = dict(trainer.__dict__)
    user_optimizer = getattr(trainer, "optimizer", None)
    groups = _optimizer_groups(user_optimizer)
    accelerator = getattr(trainer, "accelerator", None)
    acc_lists = {k: list(v) for k, v in vars(accelerator).items() if isinstance(v, list)} if accelerator else {}
    metrics = _metric_lengths(trainer)
    capture = _Capture()
    trainer.callback_handler.callbacks.insert(0, capture)
    after_prep = None
    try:
        _check_not_empty(trainer)
        with kept_rng():
            try:
                trainer.train()
            except _Stop:
                pass
            except GradflowError:
                raise
            except Exception as exc:
                raise GradflowError(f"trainer.train() failed before its first step: {type(exc).__name__}: "
                                    f"{_first_line(exc)}{_where(exc)}",
                                    "Fix the trainer's set-up (args, dataset, collator), then run again") from exc
            else:
                raise GradflowError("trainer.train() finished without starting: it reached no on_train_begin",
                                    "Check max_steps / num_train_epochs and the train dataset")
        seen = capture.seen
        after_prep = ModelState(model)
        live = trainer.model  # the unwrapped model (PEFT wrapping by SFTTrainer happened in its __init__)
        loader = seen.get("train_dataloader")
        batch = trainer._prepare_inputs(first_batch(loader)) if loader is not None else None
        setup = Setup(model=live, kind=Kind.TRAINER, source=type(trainer).__name__, batch=batch,
                      loss_fn=_trainer_loss(trainer, _num_items(trainer, batch)), optimizer=seen.get("optimizer") or trainer.optimizer,
                      tokenizer=getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None))
        setup.find_unused_parameters = find_unused_parameters(trainer, live)
        setup.static_graph = bool(getattr(trainer.args, "ddp_static_graph", False))
        setup.lr_scheduler = seen.get("lr_scheduler")  # for --steps: the schedule the run will step
        setup.fsdp_plan = fsdp1_plan(trainer, live)  # FSDP1 refuses a bad unit when it wraps: judge the plan
        setup.hints = trainer_hints(trainer.args)
        yield setup
    finally:
        with contextlib.suppress(ValueError):
            trainer.callback_handler.callbacks.remove(capture)
        # undo the preparation (train() does it again), keep what changed inside the block
        before.restore(since=after_prep if after_prep is not None else ModelState(model))
        trainer.__dict__.clear()
        trainer.__dict__.update(saved)
        _trim_metrics(trainer, metrics)
        if accelerator is not None:
            for k, v in acc_lists.items():
                setattr(accelerator, k, v)
        if groups is not None:
            for g, old in zip(user_optimizer.param_groups, groups):
                for key in list(g):
                    if key != "params" and key not in old:
                        del g[key]
                g.update(old)


def _check_not_empty(trainer) -> None:
    """An empty train dataset is one line naming why, not the sampler's `num_samples=0` from inside train()."""
    dataset = getattr(trainer, "train_dataset", None)
    try:
        empty = dataset is not None and len(dataset) == 0
    except TypeError:  # an iterable dataset has no length: its first batch tells
        return
    if not empty:
        return
    max_length = getattr(trainer.args, "max_length", None)
    if max_length:  # TRL >= 1 truncates to max_length, then drops the examples left with no supervised token
        raise GradflowError(f"the trainer's train dataset is empty: truncation to max_length={max_length} left no "
                            "supervised token in any example (the prompts fill it), and the trainer dropped them all",
                            f"Raise max_length above the longest prompt (now {max_length}), or shorten the prompts")
    raise GradflowError("the trainer's train dataset is empty: there is no first batch to probe",
                        "Pass a train_dataset with at least one sample")


def trainer_hints(args) -> dict[str, str]:
    """Fixes that fit a Trainer's own set-up, beyond the finding's generic fix title."""
    hints = {}
    gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(args, "gradient_checkpointing", False) and gc_kwargs.get("use_reentrant", True) is not False:
        # the Trainer (re-)enables checkpointing inside train(): a call on the model beforehand is overridden
        hints["reentrant-checkpoint-no-input-grad"] = (
            'TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})')
    return hints


def _num_items(trainer, batch):
    """The supervised-token count the Trainer passes to compute_loss for this batch (None when it passes none)."""
    count = getattr(trainer, "_get_num_items_in_batch", None)
    if batch is None or count is None:
        return None
    try:
        return count([batch], trainer.args.device)
    except Exception:  # a batch without labels, or an older Trainer: compute_loss then gets none either
        return None


def _trainer_loss(trainer, num_items_in_batch):
    """`loss_fn(model, batch)` through the trainer's own compute_loss (a subclass's custom loss included), with
    the `num_items_in_batch` its training step passes, so the probed loss is the one the step computes."""

    def loss_fn(model, batch):
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)

    return loss_fn


def _metric_lengths(trainer) -> dict:
    """TRL's compute_loss appends token accuracy / entropy to `trainer._metrics`: their lengths, to put back."""
    metrics = trainer.__dict__.get("_metrics")
    if not isinstance(metrics, dict):
        return {}
    return {mode: {k: len(v) for k, v in d.items() if isinstance(v, list)}
            for mode, d in metrics.items() if isinstance(d, dict)}


def _trim_metrics(trainer, lengths: dict) -> None:
    metrics = trainer.__dict__.get("_metrics")
    if not isinstance(metrics, dict):
        return
    for mode, d in metrics.items():
        if not isinstance(d, dict):
            continue
        for k in list(d):
            if not isinstance(d[k], list):
                continue
            n = lengths.get(mode, {}).get(k)
            if n is None:
                del d[k]
            else:
                del d[k][n:]
