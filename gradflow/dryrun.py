"""Dry run without weights: a setup's structure judged on a toy-width twin of the real config (gradflow.setup.twin).

The usual recipe (quantization, checkpointing, LoRA) and the usual probe run on it with a
synthetic batch. Which trainable parameters get a gradient, where the first cut is, and every structural finding do
not depend on width, so they are the real model's. Parameter counts and bytes come from the full-size config, built
on the meta device (no memory, no weights). Findings about values and data are not the real model's, and are left
out: see UNSEEN.
"""

from __future__ import annotations

import contextlib

from gradflow.api import snapshot
from gradflow.errors import GradflowError
from gradflow.fixes import findings_for
from gradflow.limits import check_int
from gradflow.report import Report, build_report
from gradflow.setup.build import build
from gradflow.setup.load import check_lora_flags, make_batch
from gradflow.setup.sources import Kind, Setup
from gradflow.setup.twin import build_twin, twin_shape
from gradflow.setup.twin_size import to_full_size

# What a dry run cannot see, and why: they depend on the real weights' values or on real data.
UNSEEN: dict[str, str] = {
    "nonfinite-grad": "NaN/Inf depend on the real weights' values; the twin's are random",
    "no-supervised-tokens": "depends on real data and its label mask; the dry run probes a synthetic batch",
    "param-not-in-optimizer": "needs the optimizer you train with; a config builds none",
}
# Values that are the twin's, not the model's: the loss is left out; gradient norms are kept only to show which
# layers get a gradient at all (their sizes come from random toy weights).
UNSEEN_VALUES = ("the loss value", "gradient sizes (the norms shown are the twin's)",
                 "zero gradients other than LoRA's zero-init lora_A")



def dry_run(spec: str, opts, *, command: str = "probe-backward", static: bool = False, batch_size: int = 2,
            seq_len: int = 32, seed: int = 0, data: str | None = None) -> Report:
    """Judge the setup `opts` describe for the model `spec` names, without loading its weights.

    Args:
        spec: a config.json path, a directory holding one (its weights, if any, are not read), a preset, or a hub id
            (its config only).
        opts: the setup (gradflow.setup.build.SetupOptions): LoRA, quantization, checkpointing, dtype, trainable.
        command: "probe-backward" (forward and backward) or "inspect" (forward only, or nothing when `static`).
        static: for inspect: describe the module tree without running the twin.
        batch_size, seq_len, seed: the synthetic batch.
        data: refused: a dry run cannot tokenise real data for a toy vocab.

    Returns:
        A Report with the full-size model's parameter counts, the twin's structural findings (minus UNSEEN), and
        `dry_run` saying what the dry run did and could not see.
    """
    if command not in ("probe-backward", "inspect"):
        raise ValueError(f"dry_run command {command!r}")
    check_int("--batch-size", batch_size)
    check_int("--seq-len", seq_len)
    with _one_thread(), _no_cyclic_gc():
        return _dry_run(spec, opts, command=command, static=static, batch_size=batch_size, seq_len=seq_len, seed=seed,
                        data=data)


@contextlib.contextmanager
def _one_thread():
    """The twin's tensors are tiny: one intra-op thread, as thread hand-offs cost more than the math (worse on a
    busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_cyclic_gc():
    """No cyclic garbage collection while the dry run runs: a many-expert report makes ~10^5-10^6 small objects (every
    real expert's parameter and module entries), and each collection would walk the whole heap (4x the CPU time on a
    128-expert config). Reference counting still frees what is dropped; collection resumes after."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _dry_run(spec, opts, *, command, static, batch_size, seq_len, seed, data) -> Report:
    if data is not None:
        raise GradflowError("--dry-run probes a synthetic batch on a toy-width twin, so --data cannot be used",
                            "Drop --data (a run with the weights checks real samples)")
    if opts.adapter is not None:
        raise GradflowError("--dry-run loads no weights, so it cannot load --adapter",
                            "Describe the adapter with --lora-r / --lora-targets, or drop --dry-run")
    twin, model = build_twin(spec, opts)
    setup = Setup(model=model, kind=twin.kind if twin.kind != Kind.CONFIG else Kind.DIR, source=spec,
                  preset=spec if twin.kind == Kind.PRESET else None)
    check_lora_flags(setup, opts)
    setup = build(setup, opts)
    model = setup.model
    batch = None
    if not static:
        batch = make_batch(setup, data=None, batch_size=batch_size, seq_len=seq_len, seed=seed)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with contextlib.redirect_stdout(_Stderr()):
        snap = snapshot(model, batch, trainable=setup.trainable, backward=command == "probe-backward",
                        static=static)
    size = to_full_size(snap, twin.size, shapes, opts)
    findings = [f for f in findings_for(snap) if f.slug not in UNSEEN]
    report = build_report(snap, findings, command)
    if report.loss is not None:
        report.loss["value"] = None  # the twin's loss is not the model's
    report.model.update({"class": type(model).__name__, "params_total": size["params_total"],
                         "params_trainable": size["params_trainable"], "weights_bytes": size["weights_bytes"],
                         "dry_run": True})
    report.params["trainable_numel"] = size["params_trainable"]
    report.dry_run = {
        "weights_loaded": False,
        "method": "toy-width twin: the same architecture class, module tree, parameter names and layer count at toy "
                  "width (a mixture of experts keeps 2 experts per layer, each standing for every real expert of its "
                  "index modulo 2), random init; the setup and probe as usual on a synthetic batch; sizes from the "
                  "full config on the meta device, extrapolated to the real expert count",
        "config_class": type(twin.config).__name__,
        "config": twin_shape(twin.config),
        "twin": twin_shape(twin.twin_config),
        "full_size": {k: v for k, v in size.items() if not k.startswith("unmapped")},
        "unmapped_params": size["unmapped_params"], "unmapped_count": size["unmapped_count"],
        "not_seen": dict(UNSEEN),
        "not_seen_values": list(UNSEEN_VALUES),
    }
    return report


class _Stderr:
    """What the twin's forward prints goes to stderr: stdout carries only data."""

    def write(self, text):
        import sys

        return sys.stderr.write(text)

    def flush(self):
        import sys

        sys.stderr.flush()


def note_text(report: Report) -> str:
    """The lines a dry run adds to the text report: what it did and what it cannot see."""
    info = report.dry_run or {}
    size = info.get("full_size", {})
    twin = info.get("twin", {})
    cfg = info.get("config", {})
    lines = [
        f"dry run: no weights loaded; judged on a toy-width twin of {info.get('config_class', '?')} "
        f"({cfg.get('num_hidden_layers', '?')} layers, hidden {twin.get('hidden_size', '?')} instead of "
        f"{cfg.get('hidden_size', '?')}{_experts_text(cfg, twin)}, same module tree and parameter names)",
        f"full size: {size.get('params_total', 0):,} parameters ({_human(size.get('weights_bytes', 0))} of weights), "
        f"{size.get('params_trainable', 0):,} trainable",
        "not seen by a dry run: " + "; ".join(f"{slug} ({why})" for slug, why in info.get("not_seen", {}).items())
        + "; values: " + ", ".join(info.get("not_seen_values", [])),
    ]
    if info.get("unmapped_count"):
        lines.append(f"{info['unmapped_count']} parameter(s) counted at the twin's size (no full-size match), "
                     f"e.g. {info['unmapped_params'][0]}")
    return "\n".join(lines)


def _experts_text(cfg: dict, twin: dict) -> str:
    if "experts" not in cfg or cfg["experts"] == twin.get("experts"):
        return ""
    return f", {twin.get('experts')} experts per layer standing for {cfg['experts']}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def refuse_flags(flags: dict) -> None:
    """Options that need the real weights or data, refused with --dry-run rather than silently ignored."""
    given = [flag for flag, value in flags.items() if value]
    if given:
        raise GradflowError(f"--dry-run loads no weights, so {', '.join(given)} cannot run",
                            f"Drop {', '.join(given)}, or drop --dry-run on a machine that holds the weights")
