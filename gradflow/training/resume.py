"""What `--resume` continues: the newest intact checkpoint, made by the same run.

A run's fingerprint is every option that changes what it learns (model, data content, seed, batch, schedule,
LoRA, precision …). Each checkpoint records it; `--resume` compares it with the command's own and refuses a
difference, naming it, unless `--resume-anyway`. Options that change only how it runs (--gc, --device,
--save-steps, logging, checks) are left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from gradflow.errors import GradflowError
from gradflow.report import Report
from gradflow.setup.options import DEFAULT_LORA_R, DTYPES, resolved_lora
from gradflow.setup.presets import PRESETS
from gradflow.setup.sources import names_code
from gradflow.training.checkpoint import Intact, complete_checkpoints, newest_intact, sha256_file

# fingerprint key → how the command line spells it
LABELS = {
    "model": "MODEL", "data_sha256": "--data", "seed": "--seed", "batch_size": "--batch-size",
    "grad_accum": "--grad-accum", "seq_len": "--seq-len", "learning_rate": "--lr", "max_steps": "--max-steps",
    "epochs": "--epochs", "warmup_steps": "warmup steps", "precision": "--precision", "loss_on": "--loss-on",
    "so8_layers": "--so8-layers", "recipe": "--recipe", "unsafe_fixes": "--unsafe-fixes", "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets", "adapter": "--adapter",
    "adapter_trainable": "--adapter-trainable", "quant": "--quant", "dtype": "--dtype", "trainable": "--trainable",
    "world_size": "processes (WORLD_SIZE)", "packing": "--no-packing", "tokens_per_batch": "--tokens-per-batch",
    "model_files": "MODEL's files", "think_lenient": "--think-lenient",
}
# what in a model directory changes the run: config, weights, tokenizer and chat template, custom code
_MODEL_FILE = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".py")
_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones by size and three 1 MiB samples


def _path_or_name(spec: Any) -> Any:
    """A spec naming a local path compares by absolute path (the same run, resumed from another directory)."""
    if not isinstance(spec, str):
        return None if spec is None else f"<{type(spec).__name__} object>"
    head = spec.split(":", 1)[0] if spec.split(":", 1)[0].endswith(".py") else spec
    return spec.replace(head, os.path.abspath(head), 1) if os.path.exists(head) else spec


def fingerprint(model: Any, data: str, opts, ropts) -> dict:
    """The options of this run that change the weights it ends with (TrainOptions and SetupOptions)."""
    return {
        # `data` is a file: a pipe was read once into one (gradflow.data.jsonl.read_once) by the caller
        "model": _path_or_name(model), "data_sha256": sha256_file(data), "seed": opts.seed,
        "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "seq_len": opts.seq_len,
        "learning_rate": opts.learning_rate, "max_steps": opts.max_steps,
        "epochs": opts.epochs if opts.max_steps is None else None,  # Trainer ignores epochs beside max_steps
        "warmup_steps": opts.warmup_steps, "precision": opts.precision, "loss_on": opts.loss_on,
        "so8_layers": list(ropts.so8_layers), "recipe": _path_or_name(opts.recipe), "unsafe_fixes": opts.unsafe_fixes,
        "lora_r": ropts.lora_r, "lora_alpha": ropts.lora_alpha, "lora_targets": ropts.lora_targets,
        "adapter": _path_or_name(ropts.adapter), "adapter_trainable": ropts.adapter_trainable, "quant": ropts.quant,
        "dtype": ropts.dtype, "trainable": ropts.trainable, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        # packing changes the batches; a planned token budget is recorded after planning (tokens_per_batch_planned)
        "packing": opts.packing, "tokens_per_batch": opts.tokens_per_batch, "model_files": model_files(model),
        "think_lenient": opts.think_lenient,
    }


def _resolved(key: str, fp: dict):
    """`fp[key]` as the build resolves it, so that `--lora-r 8` typed equals it omitted (the rank a preset, directory
    or hub id gets; alpha 2·r; all-linear) and `--dtype fp32` equals float32 (and, for a preset, no --dtype)."""
    value, model = fp[key], fp.get("model")
    if key == "dtype":  # a preset is built in float32 unless told otherwise (a directory: as its stack loads it)
        return DTYPES.get(value, value) if value is not None else "float32" if model in PRESETS else None
    if value is not None or key not in ("lora_r", "lora_alpha", "lora_targets") or fp.get("adapter") is not None:
        return value
    if isinstance(model, str) and os.path.isfile(os.path.join(model, "adapter_config.json")):
        return value  # MODEL is an adapter: it brings its own LoRA
    builds = isinstance(model, str) and not model.startswith("<") and not names_code(model)  # not a factory
    rank, alpha, targets = resolved_lora(fp.get("lora_r"), fp.get("lora_alpha"), fp.get("lora_targets"),
                                         DEFAULT_LORA_R if builds else 0)
    return {"lora_r": rank, "lora_alpha": alpha, "lora_targets": targets}[key]


def model_files(model: Any) -> dict[str, str] | None:
    """A MODEL directory's files by content (`size:sha256`), so that weights replaced between a kill and --resume
    are a difference, not a silent new base; None for a preset, hub id, factory or object."""
    if not isinstance(model, str) or not os.path.isdir(model):
        return None
    found = {}
    for name in sorted(os.listdir(model)):
        path = os.path.join(model, name)
        if name.endswith(_MODEL_FILE) and os.path.isfile(path):
            size = os.path.getsize(path)
            found[name] = f"{size}:{sha256_file(path) if size <= _WHOLE else _sampled_sha256(path, size)}"
    return found


def _sampled_sha256(path: str, size: int) -> str:
    """SHA-256 of a large file's first, middle and last MiB: a new checkpoint of the same shapes differs in each."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset in (0, size // 2, size - (1 << 20)):
            fh.seek(offset)
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def differences(saved: dict, current: dict) -> list[str]:
    """'--seed 0 → 1' per option that differs, compared as resolved (keys only one side knows are not compared)."""

    def shown(key, value):
        if value is None:
            return "(default)"
        if key == "data_sha256":
            return f"sha256 {value[:12]}…"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "(none)"
        return str(value)

    out = []
    for key, label in LABELS.items():
        if key in saved and key in current and saved[key] != current[key]:
            was, now = _resolved(key, saved), _resolved(key, current)
            if was != now and key == "model_files":
                changed = sorted(n for n in set(was or {}) | set(now or {}) if (was or {}).get(n) != (now or {}).get(n))
                out.append(f"{label} changed ({', '.join(changed)})")
            elif was != now:
                what = f"{label} content" if key == "data_sha256" else label
                out.append(f"{what} {shown(key, was)} → {shown(key, now)}")
    return out


@dataclasses.dataclass
class Plan:
    """Where --resume continues from, and what it found on the way."""

    checkpoint: str
    step: int
    total: int | None  # the run's max steps, as far as it is known before Trainer counts them
    damaged: list[tuple[str, str]]  # (path, why): newer checkpoints passed over
    differences: list[str]  # options that differ, accepted with --resume-anyway
    unchecked: bool  # the checkpoint predates fingerprints

    @property
    def reached_end(self) -> bool:
        return self.total is not None and self.step >= self.total


def find(output: str, run_dir: str) -> Intact:
    """The newest intact checkpoint of `run_dir`; GradflowError when there is none."""
    if not complete_checkpoints(run_dir):
        raise GradflowError(f"--resume: {output} holds no complete checkpoint",
                            "Run without --resume to start training")
    intact, damaged = newest_intact(run_dir)
    if intact is None:
        why = "; ".join(f"{os.path.basename(p)}: {w}" for p, w in damaged)
        raise GradflowError(f"--resume: no intact checkpoint in {output} ({why})",
                            "Pass --overwrite to train again from the start")
    return intact


def plan(intact: Intact, current: dict, opts, output: str) -> Plan:
    """Compare the checkpoint's fingerprint with this command's; refuse a difference unless --resume-anyway."""
    saved = intact.fingerprint
    found = differences(saved, current) if saved is not None else []
    if found and not opts.resume_anyway:
        raise GradflowError(f"--resume: this command differs from the run in {output}: {', '.join(found)}",
                            "Pass the run's own options to continue it, --resume-anyway to continue with these, "
                            "or another --output")
    # a --max-steps accepted with --resume-anyway moves the end; counted from --epochs, only Trainer knows it then
    total = opts.max_steps if opts.max_steps is not None else None if found else intact.max_steps
    return Plan(intact.path, intact.step, total, intact.damaged, found, saved is None)


# ----- a resumed run that had ended ---------------------------------------------------------------------------
def already_complete(plan, output: str, adapter_dir: str) -> Report | None:
    """The stored Report when the run reached its last step and wrote its outputs (`adapter_dir` among them); None
    when there is work left."""
    path = os.path.join(output, "report.json")
    if not plan.reached_end or not os.path.isdir(os.path.join(output, adapter_dir)) or not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            report = Report.from_dict(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if report.train is None or report.train.get("status") != "completed" or report.train.get("steps") != plan.step:
        return None
    report.command = "train"
    report.train["already_complete"] = True  # this call trained nothing: the run had ended
    report.train.pop("startup", None)  # the ended run's start-up, not this call's
    report.train["resume"] = as_dict(plan)
    return report  # trained_model stays None: nothing was loaded


def as_dict(plan) -> dict:
    """The resume plan as report.json records it."""
    return {"from": plan.checkpoint, "step": plan.step, "differences": plan.differences,
            "damaged": [{"checkpoint": p, "why": w} for p, w in plan.damaged]}
