"""The Trainer wiring: TrainingArguments, the model made ready for the run (attention implementation, no cache),
the live watch, and a Trainer whose loss can be the chunked cross-entropy."""

from __future__ import annotations

import os

from gradflow.errors import GradflowError
from gradflow.forward import model_device
from gradflow.models import gc_mode_of, is_peft_model
from gradflow.finding import finding_line
from gradflow.training.callback import GradFlowCallback
from gradflow.training.checkpoint import atomic_save_mixin
from gradflow.training.fsdp import enable, training_kwargs
from gradflow.training.loss import chunked_causal_lm_loss
from gradflow.training.outputs import CHECKPOINT_DIR, TB_DIR
from gradflow.training.progress import RichProgress


def training_args(opts, output: str, device: str, model=None):
    import inspect

    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=os.path.join(output, CHECKPOINT_DIR),
        per_device_train_batch_size=1 if opts.packing else opts.batch_size,  # packed: one group of rows a step
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
        num_train_epochs=opts.epochs, max_steps=opts.max_steps if opts.max_steps is not None else -1,
        logging_steps=opts.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=opts.save_steps, save_total_limit=opts.save_total_limit, seed=opts.seed,
        bf16=opts.precision == "bf16", fp16=opts.precision == "fp16", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, ddp_find_unused_parameters=False,
        dataloader_num_workers=0, warmup_steps=opts.warmup_steps, optim="adamw_torch", max_grad_norm=1.0,
        use_cpu=device == "cpu",
        # a NaN or inf loss is logged as it is: the Trainer's default filter logs the running mean instead, which
        # reads 0.0 (a perfect loss) when every step since the last log was non-finite
        logging_nan_inf_filter=False,
    )
    if getattr(opts, "fsdp", False):  # FSDP2 through accelerate's plugin (gradflow.training.fsdp)

        kwargs.update(training_kwargs(model, device))
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in accepted})


def make_trainer(setup, dataset, collator, opts, output: str, console, callbacks, progress: bool, *,
                 ce: str = "standard"):
    """(trainer, watch): Trainer with GradFlowCallback, atomic checkpoints, rich progress on stderr; `ce`: the loss
    resolve_ce chose (standard | chunked)."""
    import math

    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    device = model_device(setup.model).type
    if opts.precision == "fp16" and device == "cpu":
        raise GradflowError("--precision fp16 needs a GPU (CPU has no fp16 loss scaling)",
                            "Use --precision bf16 or fp32 on CPU")
    args = training_args(opts, output, device, setup.model)
    world = max(1, args.world_size)
    per_epoch = math.ceil(len(dataset) / (args.per_device_train_batch_size * world) / opts.grad_accum)
    total = opts.max_steps if opts.max_steps is not None else max(1, math.ceil(per_epoch * opts.epochs))
    if opts.logging_steps > total:  # a short run still logs its last loss
        args.logging_steps = total
    if world > 1 and gc_reentrant(setup.model):
        raise GradflowError("reentrant gradient checkpointing under DDP", "Use --gc non-reentrant for multi-GPU runs")
    watch = GradFlowCallback(check_every=min(opts.check_every, total), moved_at_step=min(opts.moved_at_step, total),
                             preflight=False, tensorboard_dir=os.path.join(output, TB_DIR),
                             on_finding=lambda f: console.print(f"[bold red]gradflow[/]: step finding "
                                                                f"{finding_line(f)}"))
    trainer_cls = atomic_save_mixin(_with_loss(Trainer))
    trainer = trainer_cls(model=setup.model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[watch, *callbacks])
    if getattr(opts, "fsdp", False):
        enable(trainer)
    trainer.gradflow_ce = ce
    trainer.remove_callback(PrinterCallback)  # it prints log dicts on stdout, which carries data
    trainer.remove_callback(ProgressCallback)
    if progress:  # RichProgress itself stays silent on ranks other than 0
        trainer.add_callback(RichProgress(console, lambda: collator.tokens))
    return trainer, watch


def _with_loss(base):
    """`base` with a compute_loss that takes the chunked cross-entropy when --ce chose it and it applies."""

    class GradflowTrainer(base):
        gradflow_ce = "standard"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            if self.gradflow_ce == "chunked" and not return_outputs:
                # the model sees num_items_in_batch only when it takes loss kwargs: the same loss scale as HF's path
                items = num_items_in_batch if getattr(self, "model_accepts_loss_kwargs", False) else None
                loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch=items)
                if loss is not None:
                    return loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)

    GradflowTrainer.__name__ = GradflowTrainer.__qualname__ = f"Gradflow{base.__name__}"
    return GradflowTrainer


def resolve_ce(asked: str, device: str, *, fsdp: bool = False) -> tuple[str, str]:
    """(standard | chunked, why): auto takes the chunked loss on CUDA only; never under
    --fsdp (the chunked loss calls the decoder and the head itself, and FSDP gathers the root unit's weights, the
    embeddings, the final norm and the head, only in the model's own forward)."""
    if asked == "standard":
        return "standard", "--ce standard"
    if fsdp:
        return "standard", (f"{'--ce chunked' if asked == 'chunked' else 'auto'}: not under --fsdp (FSDP gathers the "
                            "embeddings, final norm and head only in the model's own forward)")
    if asked == "chunked":
        return "chunked", "--ce chunked"
    if device == "cuda":
        return "chunked", "auto: CUDA"
    return "standard", "auto: the chunked loss saves GPU memory, and this is the CPU"


def prepare_model(model, asked: str, device: str) -> dict:
    """No cache in training (a cache turns transformers' packed-sequence masking off), and the attention
    implementation: --attn, or auto = flex_attention on CUDA where the model supports it, else sdpa.
    Returns what was chosen and why, for the report."""
    base = model.get_base_model() if is_peft_model(model) else model
    for config in {id(c): c for c in (getattr(base, "config", None), getattr(model, "config", None))
                   if c is not None}.values():
        if hasattr(config, "use_cache"):
            config.use_cache = False
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if not hasattr(base, "set_attn_implementation"):
        return {"attn": current, "why": "the model is not a transformers model: its own attention"}
    if asked == "auto":
        want, why = ("flex_attention", "auto: CUDA") if device == "cuda" and _flex_available() else \
            ("sdpa", "auto: " + ("flex_attention is not available" if device == "cuda" else "CPU"))
    else:
        want, why = asked, f"--attn {asked}"
    if want == current:
        return {"attn": want, "why": why}
    try:
        base.set_attn_implementation(want)
    except (ValueError, ImportError, NotImplementedError) as exc:
        if asked != "auto":
            raise GradflowError(f"--attn {asked}: {type(base).__name__} cannot use it ({str(exc).splitlines()[0]})",
                                "Pass --attn sdpa, or --attn auto") from exc
        if want != "sdpa":
            return prepare_model(model, "sdpa", device) | {
                "why": f"auto: {type(base).__name__} has no {want} ({str(exc).splitlines()[0][:80]})"}
        return {"attn": current, "why": f"the model keeps {current}: {str(exc).splitlines()[0][:80]}"}
    return {"attn": getattr(base.config, "_attn_implementation", want), "why": why}


def _flex_available() -> bool:
    try:
        from transformers.utils import is_torch_flex_attn_available
    except ImportError:
        return False
    return bool(is_torch_flex_attn_available())


def gc_reentrant(model) -> bool:
    return any(gc_mode_of(m) == "reentrant" for m in model.modules())


def final_state(trainer, watch, collator, seconds: float, result) -> dict:
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    last = watch.history[-1] if watch.history else None
    moved = watch.moved() if watch._params else {}
    return {
        "steps": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "world_size": trainer.args.world_size,
        "seconds": round(seconds, 2), "tokens": collator.tokens,
        "tokens_per_second": round(collator.tokens / seconds, 1) if seconds > 0 else None,
        "loss_first": losses[0]["loss"] if losses else None, "loss_last": losses[-1]["loss"] if losses else None,
        "losses": losses, "stopped_at": watch.stopped_at,
        "findings": [f.to_dict() for f in watch.findings],
        "gradients": {
            "checks": len(watch.history),
            "last_check_step": last["step"] if last else None,
            "missing": last["missing"] if last else None, "nonfinite": last["nonfinite"] if last else None,
            "per_layer": last["layers"] if last else {},
            "params_moved": sum(moved.values()), "params_trainable": len(moved),
            "moved_checked": watch.moved_checked,
        },
    }
