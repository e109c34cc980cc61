"""Proofs for the patch tests that do not trust gradflow: plain forward/backward and optimizer steps, fingerprints
of everything patch could change, and `patched` (gradflow.patch, then those proofs). The models are in builders."""

from __future__ import annotations

import math
import re

import torch


def intended_names(model, regex: str | None = None) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if regex:
        pattern = re.compile(regex)
        names += [n for n, p in model.named_parameters() if pattern.search(n) and "original_module" not in n]
    return sorted(set(names))


def assert_grads_flow(model, data, *, regex: str | None = None, loss_fn=None):
    """One plain forward/backward: every intended parameter requires grad and gets a finite gradient."""
    model.train()
    params = dict(model.named_parameters())
    names = intended_names(model, regex)
    assert names, "nothing to train"
    for p in model.parameters():
        p.grad = None
    out = loss_fn(model, data) if loss_fn else model(**data)
    loss = out if isinstance(out, torch.Tensor) else (out["loss"] if isinstance(out, dict) else out.loss)
    loss.backward()
    frozen = [n for n in names if not params[n].requires_grad]
    missing = [n for n in names if params[n].requires_grad and params[n].grad is None]
    bad = [n for n in names if params[n].grad is not None and not torch.isfinite(params[n].grad).all()]
    for p in model.parameters():
        p.grad = None
    assert not frozen and not missing and not bad, (frozen[:3], missing[:3], bad[:3])
    return names


def train(model, data, *, steps: int = 20, lr: float = 1e-2, loss_fn=None, regex: str | None = None):
    """Plain AdamW steps on one fixed batch; returns (losses, names of intended params that did not change)."""
    model.train()
    names = intended_names(model, regex)
    params = dict(model.named_parameters())
    start = {n: params[n].detach().float().clone() for n in names}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model, data) if loss_fn else model(**data)
        loss = out if isinstance(out, torch.Tensor) else (out["loss"] if isinstance(out, dict) else out.loss)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    unchanged = [n for n in names if torch.equal(start[n], params[n].detach().float())]
    return losses, unchanged


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def fingerprint(model) -> dict:
    """Everything patch could change: tensors (values and dtypes), requires_grad, hooks, checkpointing, cache flag."""
    state = {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {}
    for name, m in model.named_modules():
        func = getattr(m, "_gradient_checkpointing_func", None)
        modules[name] = (type(m).__name__, tuple(tuple(getattr(m, k).keys()) for k in _HOOK_DICTS),
                         getattr(m, "gradient_checkpointing", None), getattr(func, "keywords", None))
    config = getattr(model, "config", None)
    peft = {k: (sorted(getattr(v, "modules_to_save", None) or []), getattr(v, "inference_mode", None))
            for k, v in (getattr(model, "peft_config", None) or {}).items()}
    return {"state": state, "flags": flags, "modules": modules, "use_cache": getattr(config, "use_cache", None),
            "peft": peft}


def assert_same(a: dict, b: dict):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k][0] == b["state"][k][0], f"{k} dtype changed"
        assert torch.equal(a["state"][k][1], b["state"][k][1]), f"{k} changed"
    assert a["flags"] == b["flags"]
    assert a["modules"] == b["modules"]
    assert a["use_cache"] == b["use_cache"]
    assert a["peft"] == b["peft"]


def ids(report) -> list[str]:
    return [f["id"] for f in report.fixes_applied]


def patched(model, data, *, fixes, answers, regex=None, loss_fn=None, **kwargs):
    """gradflow.patch, then check it fixed `answers` with `fixes` and prove the gradients without gradflow."""
    import gradflow

    report = gradflow.patch(model, data, trainable=regex, loss_fn=loss_fn, **kwargs)
    for slug in answers:
        assert slug in report.before.slugs(), (slug, report.before.slugs())
        assert slug not in report.after.slugs(), (slug, report.after.slugs())
    bad = [f"{f.slug}: {f.message}" for f in report.after.findings if f.severity in ("error", "warning")]
    assert not bad, bad
    assert set(fixes) <= set(ids(report)), ids(report)
    assert all(f["verified"] for f in report.fixes_applied), report.fixes_applied
    verification = report.extra["verification"]
    assert verification["ok"] and verification["receiving"] == verification["intended"] > 0, verification
    assert report.after.params["none_grad"] == 0 and report.after.params["nonfinite_grad"] == 0
    assert_grads_flow(model, data, regex=regex, loss_fn=loss_fn)
    return report
