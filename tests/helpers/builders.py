"""Tiny real models for the tests (random init, fixed seeds, built locally): presets with real PEFT and
bitsandbytes, users' own nn.Modules and checkpoint wrappers, token batches; and the rule tests' finding assertions."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradflow
from gradflow.setup.presets import build_preset
from gradflow.forward import synthetic_batch
from tests.helpers.coverage import FALLBACK, assert_coverage
from tests.helpers.env import stack

STACK = stack()
VOCAB = 512


# --- models ------------------------------------------------------------------------------------------------------
def lora_config(**kwargs):
    from peft import LoraConfig

    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    options.update(kwargs)
    return LoraConfig(**options)


def base(preset: str = "tiny-llama", **kwargs):
    return build_preset(preset, seed=0, **kwargs)


def lora(preset="tiny-llama", *, model=None, autocast_adapter_dtype: bool = True, **kwargs):
    """get_peft_model over a fresh preset, or over a model (given as `model=` or in the preset's place), all linear
    layers targeted unless `target_modules` says otherwise."""
    from peft import get_peft_model

    if model is None and not isinstance(preset, str):
        model = preset
    return get_peft_model(model if model is not None else base(preset), lora_config(**kwargs),
                          autocast_adapter_dtype=autocast_adapter_dtype)


def enable_gc(model, *, reentrant: bool = True):
    """gradient_checkpointing_enable as users call it, on the transformers model under any PEFT wrapper (a
    deprecated alias on transformers 5, same behaviour)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def disable_input_grad_hook(model):
    """disable_input_require_grads on the transformers model under any PEFT wrapper."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(target, "_require_grads_hook", None) is not None or getattr(target, "_require_grads_hooks", None):
        target.disable_input_require_grads()
    return model


def remove_input_grad_hooks(model):
    """Remove every input-grad hook transformers or PEFT installed, on any module (5.x can leave more than one)."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if "require_grad" in getattr(hook, "__name__", ""):
                del module._forward_hooks[key]
    return model


def batch(model=None, *, batch_size: int = 2, seq_len: int = 16, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Token ids inside the vocab with labels equal to them."""
    if model is not None:
        return synthetic_batch(model, batch_size=batch_size, seq_len=seq_len, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def save_adapter_and_reload(model, tmp_path, *, is_trainable: bool, preset: str = "tiny-llama", base_model=None):
    """save_pretrained the adapter into tmp_path, then PeftModel.from_pretrained it onto a fresh base."""
    from peft import PeftModel

    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = base_model if base_model is not None else base(preset)
    return PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"), is_trainable=is_trainable)


def quantized(directory, *, bits: int, dtype=torch.bfloat16):
    """A saved preset loaded back through bitsandbytes on the CPU, as users load a QLoRA base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=config, dtype=dtype,
                                                device_map={"": "cpu"})


# --- custom nn.Modules (users' own code) ----------------------------------------------------------------------------
class Block(nn.Module):
    """A residual MLP block."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.proj(x))


class Rotation(nn.Module):
    """SO(8) rotations of the hidden state (SPEC §7): theta [d/8, 8, 8] starts at zero, so it starts as the
    identity; R = exp(theta - theta^T) per block of 8, applied in the input's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim // 8, 8, 8))

    def forward(self, x):
        rot = torch.linalg.matrix_exp(self.theta - self.theta.transpose(-1, -2))
        return torch.einsum("...gi,gij->...gj", x.unflatten(-1, (-1, 8)), rot.to(x.dtype)).flatten(-2)


class RotatedBlock(Block):
    """A residual block followed by a custom rotation module (not a Linear: LoRA never targets it)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.rot = Rotation(dim)

    def forward(self, x):
        return self.rot(super().forward(x))


class SqrtGatedBlock(Block):
    """A learnable gate that starts at zero and enters through sqrt: d sqrt(g)/dg = inf at g = 0."""

    def __init__(self, dim: int, eps: float = 0.0):
        super().__init__(dim)
        self.gate = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def forward(self, x):
        return x + torch.sqrt(self.gate + self.eps) * self.act(self.proj(x))


class TinyLM(nn.Module):
    """embedding -> blocks -> head, with a causal-LM loss when labels are given. `blocks` are swappable.

    Like most custom modules it has no get_input_embeddings, so PEFT adds no input-grad hook to it.
    """

    def __init__(self, vocab: int = 64, dim: int = 16, layers: int = 3, block=Block):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, input_ids=None, labels=None, inputs_embeds=None, attention_mask=None):
        logits = self.head(self.hidden(input_ids, inputs_embeds))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def tiny_lm(*, block=Block, layers: int = 3, freeze: bool = True, **kwargs) -> TinyLM:
    """A TinyLM whose base weights are frozen (the usual fine-tuning start) unless `freeze=False`."""
    model = TinyLM(block=block, layers=layers, **kwargs)
    if freeze:
        model.requires_grad_(False)
    return model


def custom_lora(model, targets=("proj",), **kwargs):
    """PEFT LoRA on a custom nn.Module."""
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": list(targets), "lora_dropout": 0.0}
    options.update(kwargs)
    return get_peft_model(model, LoraConfig(**options))


def custom_with(block, index: int = 1, **lora_kwargs):
    """A frozen TinyLM whose block `index` is `block(16)`, with LoRA on every `proj` (custom_lora)."""
    model = tiny_lm()
    model.blocks[index] = block(16)
    model.requires_grad_(False)
    return custom_lora(model, **lora_kwargs)


class DetachedBranch(Block):
    """Residual block whose branch is detached (a 'stop-gradient' left in from debugging)."""

    def forward(self, x):
        return x + self.act(self.proj(x)).detach()


class ValueHeadLM(TinyLM):
    """Computes a value estimate on every forward and returns it; the LM loss never uses it."""

    def __init__(self):
        super().__init__()
        self.value_head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, labels=labels)
        out["value"] = self.value_head(self.embed(input_ids)).squeeze(-1)
        return out


def value_head_lm() -> ValueHeadLM:
    """A ValueHeadLM training its blocks and its value head, the rest frozen."""
    model = ValueHeadLM()
    model.requires_grad_(False)
    model.value_head.requires_grad_(True)
    model.blocks.requires_grad_(True)
    return model


class WithSpareHead(nn.Module):
    """A TinyLM plus a trainable head the forward never calls."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_lm(freeze=False)
        self.spare = nn.Linear(16, 16)

    def forward(self, **data):
        return self.lm(**data)


def tiny_batch(vocab: int = 64, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


class TanhBlock(nn.Module):
    """A residual tanh block (CustomLM's)."""

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
        self.blocks = nn.ModuleList(TanhBlock(dim) for _ in range(layers))
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


class Checkpointed(nn.Module):
    """A user's checkpoint wrapper: runs `inner` under torch.utils.checkpoint, hidden states positional."""

    def __init__(self, inner, *, reentrant: bool = True):
        super().__init__()
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, hidden_states, *args, **kwargs):
        return checkpoint(lambda h: self.inner(h, *args, **kwargs), hidden_states, use_reentrant=self.reentrant)


class KeywordCheckpointed(nn.Module):
    """An outer reentrant checkpoint that calls the wrapped decoder layer with keyword arguments only (SPEC §1)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        def run(h):
            return self.inner(hidden_states=h, **kwargs)

        return checkpoint(run, hidden_states, use_reentrant=True)


class Rotated(nn.Module):
    """o_proj after a rotation of the attention output (looked up by attribute, as real code does)."""

    def __init__(self, proj: nn.Module, dim: int):
        super().__init__()
        self.rot = Rotation(dim)
        self.proj = proj

    def forward(self, x):
        return self.proj(self.rot(x))


def rotated_base(layers=(1, 2), preset: str = "tiny-phi3", **kwargs):
    """A preset whose attention outputs in `layers` are rotated before o_proj (SO(8)-style, custom modules)."""
    model = base(preset, **kwargs)
    dim = model.config.hidden_size
    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.o_proj = Rotated(attn.o_proj, dim).to(attn.o_proj.weight.dtype)
    return model


def seed_order():
    """SPEC §1 on tiny-phi3: get_peft_model before reentrant checkpointing; on 5.x the hook it adds is removed (the
    same state on both stacks)."""
    return remove_input_grad_hooks(enable_gc(lora("tiny-phi3")))


def wrap_layers(model, wrapper, **kwargs):
    """Replace every decoder layer of a (PEFT-wrapped) Llama/Phi-3 with `wrapper(layer)`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.model.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = wrapper(layer, **kwargs)
    return model


# --- probing and assertions -----------------------------------------------------------------------------------------
def probe(model, data=None, **kwargs):
    return gradflow.probe(model, data, **kwargs)


# SPEC §5: the severity of every slug is part of the public contract
SPEC_SEVERITY = {
    "no-trainable-parameters": "error", "adapter-frozen": "error", "intended-param-frozen": "error",
    "reentrant-checkpoint-no-input-grad": "error", "nested-checkpoint": "error", "graph-break": "error",
    "loss-detached": "error", "no-supervised-tokens": "error", "nonfinite-grad": "error",
    "param-not-in-optimizer": "error", "inference-tensor-params": "error", "ddp-reentrant-checkpoint": "error",
    "packed-attention-leak": "error",
    "fsdp-mixed-requires-grad": "error", "fsdp-mixed-dtype": "error", "ddp-unused-parameters": "error",
    "checkpoint-changes-gradients": "error", "param-not-updated": "error", "zero-learning-rate": "error",
    "trainable-param-unused": "warning", "trainable-embeddings-costly": "warning",
    "half-precision-trainable-params": "warning", "trainable-param-not-saved": "warning",
    "kbit-not-prepared": "warning",
    "requires-grad-changed": "error", "grad-missing-unexplained": "warning",  # issue 18: coverage
    "grad-all-zero": "error",  # gradflow's own, beyond SPEC §5 (issue 18)
    "lora-zero-init": "info", "use-cache-in-training": "info",
}
SPEC_SEVERITY["loss-term-no-grad"] = "warning"  # issue 18: a term added to the loss without a gradient
_ANY = object()


def findings(report, slug: str):
    return [f for f in report.findings if f.slug == slug]


def assert_fires(report, slug: str, *, severity: str | None = None, location=_ANY):
    """Exactly one finding of `slug`, at the SPEC's severity, at `location` (None: a whole-model finding).

    Whenever the finding has a location, its message must name that module path too. The coverage invariant holds.
    """
    from gradflow.rules.codes import SLUGS

    assert_coverage(report, fallback_expected=slug == FALLBACK)
    got = findings(report, slug)
    assert len(got) == 1, f"expected one {slug}, got {_describe(report)}"
    finding = got[0]
    assert finding.code == SLUGS[slug]
    assert finding.severity == SPEC_SEVERITY[slug]
    if severity is not None:
        assert finding.severity == severity
    if location is not _ANY:
        assert finding.location == location, f"{slug} at {finding.location!r}, expected {location!r}"
    if finding.location:
        assert finding.location in finding.message or finding.location.rsplit(".", 1)[0] in finding.message, (
            f"{slug}: message does not name {finding.location}: {finding.message}")
    return finding


def assert_silent(report, *slugs: str):
    assert_coverage(report)
    fired = [f for f in report.findings if f.slug in slugs]
    assert not fired, f"unexpected {', '.join(f.slug for f in fired)}: {_describe(report)}"


def assert_healthy(report):
    """No error and no warning (info is allowed)."""
    assert_coverage(report)
    bad = [f for f in report.findings if f.severity in ("error", "warning")]
    assert not bad, f"healthy setup reported: {_describe(report)}"
    assert not report.fails("warning")


def _describe(report) -> str:
    rows = [f"{f.slug}[{f.severity}] @{f.location}: {f.message}" for f in report.findings]
    return "\n  " + "\n  ".join(rows) if rows else "no findings"
