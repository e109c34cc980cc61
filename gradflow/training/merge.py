"""Reload a trained adapter (SO(8) rotations included), and merge it into a standalone model."""

from __future__ import annotations

import os
import shutil

from gradflow.errors import GradflowError
from gradflow.limits import SEED_MAX
from gradflow.setup.build import build, read_json
from gradflow.setup.options import SetupOptions
from gradflow.setup.load import _try_tokenizer
from gradflow.setup.sources import resolve
from gradflow.setup import so8
from gradflow.setup.so8 import load_adapter
from gradflow.training.outputs import RUN_META


def _run_meta(adapter_dir: str) -> dict:
    """The run metadata train wrote, else the adapter config's base; `named_in` says which file and field."""
    path = os.path.join(adapter_dir, RUN_META)
    if os.path.isfile(path):
        return {**read_json(path), "named_in": f"{path} (base)"}
    path = os.path.join(adapter_dir, "adapter_config.json")
    return {"base": read_json(path).get("base_model_name_or_path"), "base_seed": 0,
            "named_in": f"{path} (base_model_name_or_path)"}


def load_base(adapter_dir: str, *, dtype: str | None = None, device: str = "cpu", trust_remote_code: bool = False):
    """The adapter's base model, unquantized, as it was built for training (presets: the same seed)."""
    meta = _run_meta(adapter_dir)
    base = meta.get("base")
    if not base:
        raise GradflowError(f"{adapter_dir} does not name a base model gradflow can load (it came from a factory)",
                            "Load the base yourself, then gradflow.training.load_adapter(base, DIR)")
    seed, meta_dtype = meta.get("base_seed") or 0, meta.get("dtype")
    if (not isinstance(base, str) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX
            or not isinstance(meta_dtype, (str, type(None)))):
        raise GradflowError(f"{meta['named_in']}: base, base_seed or dtype is not a valid value",
                            "Write the run again with gradflow train, or fix that file by hand")
    opts = SetupOptions(lora_r=0, dtype=dtype or meta_dtype, device=device, seed=seed,
                         trust_remote_code=trust_remote_code)
    # the run metadata is a file, perhaps from someone else: its base never runs code without --trust-remote-code
    setup = build(resolve(base, trust_remote_code=trust_remote_code, named_in=meta["named_in"]), opts)
    if setup.tokenizer is None:
        setup.tokenizer = _try_tokenizer(adapter_dir)
    return setup


def merge(adapter_dir: str, output: str, *, dtype: str | None = None, device: str = "cpu",
          trust_remote_code: bool = False) -> dict:
    """Fold LoRA and SO(8) rotations into the base weights and save a standalone model to `output`.

    Returns:
        What was written: `{"output", "so8_folded", "base"}`.
    """
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise GradflowError(f"{adapter_dir} holds no adapter_config.json",
                            "Pass the adapter directory a training run wrote (OUTPUT/adapter)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise GradflowError(f"--output {output} is a file", "Pass a new directory")
    if os.path.isdir(output) and os.listdir(output):
        raise GradflowError(f"--output {output} already holds files", "Pass a new or empty directory")
    setup = load_base(adapter_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = load_adapter(setup.model, adapter_dir)
    merged = model.merge_and_unload()
    folded = so8.fold_into_o_proj(merged)
    tmp = f"{output.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    if setup.tokenizer is not None:
        setup.tokenizer.save_pretrained(tmp)
    if os.path.isdir(output):
        os.rmdir(output)
    os.replace(tmp, output)
    return {"output": output, "so8_folded": folded, "base": _run_meta(adapter_dir).get("base")}
