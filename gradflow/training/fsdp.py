"""`gradflow train --fsdp`: FSDP2 through transformers' TrainingArguments and accelerate's FSDP plugin.

    torchrun --nproc-per-node 2 -m gradflow train MODEL --data D.jsonl --output OUT --fsdp

- `check()` refuses a bad use before any work: --fsdp outside torchrun, or with --quant (bitsandbytes' packed
  weights do not shard).
- `training_kwargs()`: the TrainingArguments fields: fsdp="full_shard auto_wrap", fsdp_config with FSDP2
  (`fsdp_version` for transformers 4.x, `version` for 5.x), each decoder layer its own unit, sharded checkpoints.
- `enable()`: on CPU accelerate (1.15) keeps the distributed type MULTI_CPU and drops the FSDP plugin silently
  (accelerate/state.py: FSDP is set only for MULTI_GPU / XPU / NPU / … types), so Trainer would train under DDP.
  There, the same plugin is set on the accelerator's state after Trainer is built, so that accelerate's own FSDP2
  path (fsdp2_prepare_model, sharded save/load) runs, on gloo. On accelerators nothing is changed.
- `save_adapter()`: every rank takes part in gathering the full (unsharded) adapter state; rank 0 writes it once.
"""

from __future__ import annotations

import os

from gradflow.errors import GradflowError
from gradflow.models import decoder_layers, is_peft_model
from gradflow.training.outputs import replace_dir, save_adapter as write

LAUNCH = "torchrun --nproc-per-node 2 -m gradflow train MODEL --data DATA --output OUT --fsdp"


def check(opts, ropts) -> None:
    if not getattr(opts, "fsdp", False):
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise GradflowError("--fsdp needs the process group that torchrun sets up (RANK / WORLD_SIZE are unset)",
                            f"Launch it as: {LAUNCH}")
    if getattr(ropts, "quant", "none") not in (None, "none"):
        raise GradflowError(f"--fsdp cannot shard a --quant {ropts.quant} model (bitsandbytes' packed weights)",
                            "Drop --quant, or train without --fsdp (DDP under torchrun)")


def _layer_classes(model) -> list[str]:
    """The decoder layer classes (each an FSDP unit): the model's _no_split_modules, else the layer list's type."""
    base = model.get_base_model() if is_peft_model(model) else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in base.modules()}
    names = [n for n in names if n in present]
    if not names:
        layers = decoder_layers(base)
        names = sorted({type(m).__name__ for m in layers}) if layers else []
    return names


def training_kwargs(model, device: str) -> dict:
    layers = _layer_classes(model)
    config = {"fsdp_version": 2, "version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT",
              # sync_module_states makes accelerate look for an accelerator device (RuntimeError on CPU); every rank
              # builds the same weights from the same seed, so there is nothing to broadcast
              "sync_module_states": device != "cpu", "cpu_ram_efficient_loading": False}
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    # transformers 4.x hands FSDP to accelerate through FSDP_* variables and sets none for the version: accelerate
    # then reads FSDP_VERSION (default 1)
    os.environ.setdefault("FSDP_VERSION", "2")
    return {"fsdp": "full_shard auto_wrap" if layers else "full_shard", "fsdp_config": config}


def enable(trainer) -> None:
    """Make accelerate's FSDP plugin active where accelerate dropped it (CPU); no-op when it is already active."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None and state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise GradflowError(f"accelerate did not enable FSDP (distributed type {state.distributed_type})",
                            f"Launch with torchrun: {LAUNCH}")
    config = trainer.args.fsdp_config or {}
    layers = config.get("transformer_layer_cls_to_wrap") or []
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
        auto_wrap_policy="transformer_based_wrap" if layers else "no_wrap",
        transformer_cls_names_to_wrap=list(layers) or None, sync_module_states=False, cpu_ram_efficient_loading=False)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def full_state(trainer) -> dict:
    """The trainable parameters' full tensors, on CPU; a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in full.items() if n in trainable}


def save_adapter(trainer, setup, model_spec, ropts, opts, path: str, is_main: bool) -> list[str]:
    """Gather on every rank; rank 0 writes the consolidated adapter (PeftModel.from_pretrained loads it) and returns
    the names of the trainable tensors kept beside it (gradflow.training.outputs.save_adapter)."""
    state = full_state(trainer)
    if not is_main:
        return []
    model = setup.model
    if hasattr(model, "peft_config"):
        original = model.save_pretrained

        def save_full(directory, *args, **kwargs):  # PEFT picks the adapter out of the gathered, unsharded tensors
            return original(directory, *args, state_dict=state, **kwargs)

        model.save_pretrained = save_full
        try:
            return write(setup, model_spec, ropts, opts, path, full=state)
        finally:
            del model.save_pretrained
    else:
        import torch

        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        torch.save(state, os.path.join(tmp, "trainable_state.pt"))
        replace_dir(tmp, path)
        return []


def local(grad):
    """A gradient's local shard (a DTensor's to_local()), else the gradient itself."""
    to_local = getattr(grad, "to_local", None)
    return to_local() if to_local is not None else grad


def sum_over_shards(sq, grads):
    """Squared norms of sharded (DTensor) gradients, summed over the ranks that hold their shards; a collective
    when any gradient is sharded (the watch checks on the same steps on every rank)."""
    if not any(hasattr(g, "to_local") for g in grads):
        return sq
    import torch
    import torch.distributed as dist

    sharded = torch.tensor([hasattr(g, "to_local") for g in grads], dtype=torch.bool, device=sq.device)
    total = sq.clone()
    dist.all_reduce(total)  # sum of each rank's local squared norms
    return total.where(sharded, sq)

