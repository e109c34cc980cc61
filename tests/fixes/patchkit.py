"""Builders and checks for the patch tests: tiny real models with real faults, and proofs that do not trust gradflow."""

from __future__ import annotations

import math
import re

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradflow.setup.presets import build_preset

STACK = "new" if int(transformers.__version__.split(".")[0]) >= 5 else "old"
VOCAB = 512


# --- models --------------------------------------------------------------------------------------------------------
def lora_config(**kwargs):
    from peft import LoraConfig

    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    options.update(kwargs)
    return LoraConfig(**options)


def base(preset: str = "tiny-phi3", **kwargs):
    return build_preset(preset, seed=0, **kwargs)


def lora(model=None, preset: str = "tiny-phi3", autocast_adapter_dtype: bool = True, **kwargs):
    from peft import get_peft_model

    return get_peft_model(model if model is not None else base(preset), lora_config(**kwargs),
                          autocast_adapter_dtype=autocast_adapter_dtype)


def gc_on(model, *, reentrant: bool = True):
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def remove_input_grad_hooks(model):
    """Remove every input-grad hook transformers or PEFT installed (5.x can leave more than one behind)."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if "require_grad" in getattr(hook, "__name__", ""):
                del module._forward_hooks[key]
    return model


def batch(seed: int = 0, batch_size: int = 2, seq_len: int = 16, vocab: int = VOCAB) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def seed_order():
    """SPEC §1: get_peft_model before reentrant checkpointing; on 5.x the hook it adds is removed (same state)."""
    model = gc_on(lora())
    return remove_input_grad_hooks(model)


class Rot(nn.Module):
    """An SO(8)-style rotation: theta [d/8, 8, 8] starts at zero (identity), R = exp(theta - theta^T) per block."""

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim // 8, 8, 8))

    def forward(self, x):
        r = torch.linalg.matrix_exp(self.theta - self.theta.transpose(-1, -2))
        shape = x.shape
        blocks = x.reshape(*shape[:-1], shape[-1] // 8, 8)
        return torch.einsum("...gi,gij->...gj", blocks, r.to(x.dtype)).reshape(shape)


class Rotated(nn.Module):
    """o_proj after a rotation of the attention output (looked up by attribute, as real code does)."""

    def __init__(self, proj: nn.Module, dim: int):
        super().__init__()
        self.rot = Rot(dim)
        self.proj = proj

    def forward(self, x):
        return self.proj(self.rot(x))


def rotated_base(layers=(1, 2), preset: str = "tiny-phi3", **kwargs):
    model = base(preset, **kwargs)
    dim = model.config.hidden_size
    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.o_proj = Rotated(attn.o_proj, dim).to(attn.o_proj.weight.dtype)
    return model


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class CustomLM(nn.Module):
    """A user's own model: embedding -> reentrant-checkpointed blocks -> head (no transformers)."""

    def __init__(self, vocab: int = 64, dim: int = 16, layers: int = 3, embeds: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim) if embeds else None
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids=None, labels=None, features=None):
        h = self.embed(input_ids) if features is None else features
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=True)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def custom_lora(model, targets=("proj",)):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))


def custom_batch(vocab: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


class UserCheckpointed(nn.Module):
    """A user's reentrant checkpoint around a decoder layer, hidden states positional."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        return checkpoint(lambda h: self.inner(h, *args, **kwargs), hidden_states, use_reentrant=True)


class KeywordCheckpointed(nn.Module):
    """SPEC §1: an outer reentrant checkpoint calling a self-checkpointing layer with keyword arguments only."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        return checkpoint(lambda h: self.inner(hidden_states=h, **kwargs), hidden_states, use_reentrant=True)


def wrap_layers(model, wrapper):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.model.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = wrapper(layer)
    return model


# --- proofs that do not trust gradflow ------------------------------------------------------------------------------
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
