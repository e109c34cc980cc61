"""The run directory: its layout, the --output checks, RUN_META, and the adapter written atomically.

OUTPUT/
  adapter/        the trained adapter (PeftModel.from_pretrained loads it), tokenizer, RUN_META, SO(8) meta
  checkpoints/    Trainer's checkpoints, each renamed into place whole (gradflow.training.checkpoint)
  tensorboard/    the live watch's scalars
  merged/         with --merge: LoRA and SO(8) folded into the base
  report.json, audit.jsonl, grad_norms.png
"""

from __future__ import annotations

import json
import os
import shutil

from gradflow.errors import GradflowError
from gradflow.setup.sources import Kind
from gradflow.setup import so8
from gradflow.training.lock import LOCK_NAME
from gradflow.training.resume import find

ADAPTER_DIR, CHECKPOINT_DIR, TB_DIR = "adapter", "checkpoints", "tensorboard"
RUN_META = "gradflow_train.json"  # how the adapter's base was built: merge and load_base read it
# what a run writes in OUTPUT, and --overwrite removes
RUN_FILES = (ADAPTER_DIR, CHECKPOINT_DIR, TB_DIR, "merged", "report.json", "audit.jsonl", "grad_norms.png")


def check_output_path(output: str) -> None:
    """--output must be (or be creatable as) a directory: checked before the lock creates it."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise GradflowError(f"--output {output} is a file, not a directory", "Pass a new or existing directory")
    parent = os.path.dirname(os.path.abspath(output))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise GradflowError(f"--output {output}: {parent} is a file, not a directory", "Pass a path under a directory")


def check_output(output: str, opts):
    """With --output locked, before any work: the intact checkpoint to resume from (checkpoint.Intact), if any."""
    linked = [name for name in RUN_FILES if os.path.islink(os.path.join(output, name))]
    if linked:  # a run reads, writes and deletes only inside its own directory, never through a link out of it
        raise GradflowError(f"--output {os.path.join(output, linked[0])} is a symbolic link, and a run writes and "
                            "deletes only inside its own directory", "Remove the link, or pass another --output")
    if opts.resume:
        return find(output, os.path.join(output, CHECKPOINT_DIR))
    held = [n for n in os.listdir(output) if n != LOCK_NAME] if os.path.isdir(output) else []
    if held and rank() == 0:
        # only rank 0 checks: under torchrun it may already have written here when another rank looks
        if not opts.overwrite:
            raise GradflowError(f"--output {output} already holds files",
                                "Pass --resume to continue that run, --overwrite to replace it, or a new directory")
    return None


def rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def prepare_output(output: str, opts) -> None:
    if rank() != 0:
        return
    if opts.overwrite and os.path.isdir(output):
        for name in RUN_FILES:
            path = os.path.join(output, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(output, exist_ok=True)


def save_adapter(setup, model_spec, ropts, opts, path: str, full: dict | None = None) -> list[str]:
    """The adapter, written atomically: PeftModel.from_pretrained loads it; gradflow.load_adapter adds SO(8) and the
    trainable tensors save_pretrained leaves out (their names are returned). `full`: FSDP's gathered tensors."""
    model = setup.model
    if not hasattr(model, "peft_config"):
        # not a PEFT model (a factory's own module): save its trainable state, which is what trained
        import torch

        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, os.path.join(tmp, so8.OUTSIDE_FILE))
        replace_dir(tmp, path)
        return []
    base = model_spec if isinstance(model_spec, str) and setup.kind in (Kind.PRESET, Kind.DIR, Kind.HUB) else None
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    outside = so8.outside_adapter(model, full)
    if outside:  # trained, yet dropped by save_pretrained (trainable-param-not-saved): kept beside the adapter
        import torch

        torch.save(outside, os.path.join(tmp, so8.OUTSIDE_FILE))
    config_path = os.path.join(tmp, "adapter_config.json")
    if base is not None and os.path.isfile(config_path):
        # written after saving: a preset name resolves again through gradflow (a temp path would not), and
        # PEFT would otherwise try to look the name up on the hub while saving
        with open(config_path) as fh:
            adapter_config = json.load(fh)
        adapter_config["base_model_name_or_path"] = base
        with open(config_path, "w") as fh:
            json.dump(adapter_config, fh, indent=2)
    if ropts.so8_layers:
        so8.write_meta(tmp, ropts.so8_layers)
    with open(os.path.join(tmp, RUN_META), "w") as fh:
        json.dump({"base": base, "base_kind": setup.kind, "base_seed": ropts.seed, "quant": ropts.quant,
                   "dtype": ropts.dtype, "so8_layers": ropts.so8_layers}, fh, indent=2)
    if setup.tokenizer is not None:
        try:
            setup.tokenizer.save_pretrained(tmp)
        except Exception:  # a tokenizer that cannot save is no reason to lose the adapter
            pass
    replace_dir(tmp, path)
    return list(outside)


def replace_dir(tmp: str, path: str) -> None:
    if os.path.isdir(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
