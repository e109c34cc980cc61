"""`gradflow train --compile auto|on|off`: torch.compile of each decoder layer.

Why: on the H200 profile of a LoRA step (bench/results/train_compare_profile_lora_a_H200.txt) matmuls took 34% of
the CUDA time and unfused elementwise kernels 45% (dtype casts, RMSNorm, rotary, SiLU·mul, the LoRA scaling, most of
them inside the decoder layers). Inductor fuses them.

How:
- Each decoder layer (transformers' GradientCheckpointingLayer, both stacks) is compiled in place with
  `nn.Module.compile`: parameter names and state_dict keys stay as they are (no `_orig_mod.` prefix), so checkpoints,
  resume, the live watch and the adapter save see the same model. Checkpointed layers compile with their checkpoint
  (dynamo traces torch.utils.checkpoint).
- `dynamic=True`: a packed batch has a new length every step; one graph then serves every length. The layers share
  their code, so a run compiles a few graphs in all, not one per layer (measured on tiny Llama: 2 on 4.57 and on 5.x
  — the first layer, whose input needs no gradient, and the others).
- It happens after the pre-flight and the memory plan: they probe the eager model with hooks, and the gradient
  flow they prove does not change with compilation (tests/training/test_compile.py compares the losses).
- Regional: every decoder layer of a model runs the same code, and dynamo guards on that code and the inputs' shapes
  and flags, not on which layer instance it is (torch 2.5+ inlines nn.Module calls: parameters are graph inputs), so
  the same few compiled graphs serve every identical layer; the count does not grow with the layers
  (tests/training/test_startup.py counts them for 2 and 6 layers: 2 on 5.x, 4 on 4.57). The plan and the pre-flight run eagerly before it, so nothing
  compiled for their shapes is thrown away, and `dynamic=True` means no recompile when training's lengths vary.
- Cached across runs: inductor's FX graph cache and AOTAutograd's cache (on by default in torch 2.5+) live in
  $TORCHINDUCTOR_CACHE_DIR, which gradflow points at ~/.cache/gradflow/inductor (gradflow.data.cache.compile_dir)
  unless the user set it or turned caching off: torch's own default is under /tmp. A second run of the same
  model shape loads the compiled kernels instead of generating them again.
- auto: on for CUDA with Triton in a single process; off on the CPU (compiling costs more than short CPU runs win),
  under torchrun / accelerate launch, whatever the world size (on an H200, `train --fsdp` with compiled layers
  made no step in two minutes under a one-process torchrun; DDP/FSDP with compiled layers has not been measured),
  and without Triton. Under auto a layer that fails to compile runs eagerly (dynamo's suppress_errors: a run the
  user did not ask to compile must not die of it); `--compile on` compiles anyway and lets a compile error stop
  the run.
"""

from __future__ import annotations

import os

from gradflow.data import cache as caches
from gradflow.models import decoder_layers


def resolve(asked: str, device: str) -> tuple[bool, str]:
    """(compile?, why) for --compile `asked` on `device`."""
    if asked == "off":
        return False, "--compile off"
    if asked == "on":
        return True, "--compile on"
    if device != "cuda":
        return False, "auto: compiling pays off on CUDA, and this is the CPU"
    if "WORLD_SIZE" in os.environ:  # torchrun / accelerate launch, even with one process
        return False, "auto: not under torchrun (compiled layers are untested with DDP/FSDP; --compile on forces it)"
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False, "auto: this torch cannot tell whether Triton is present"
    if not has_triton():
        return False, "auto: Triton is not installed (pip install triton)"
    return True, "auto: CUDA"


def compile_layers(model, *, fall_back: bool = False, backend: str = "inductor") -> int:
    """Compile each decoder layer in place (dynamic shapes); returns how many were compiled. `fall_back`: a layer
    that fails to compile runs eagerly instead of raising. `backend`: torch.compile's (tests count graphs with
    aot_eager, which traces forward and backward as inductor does without generating code)."""
    layers = decoder_layers(model, checkpointable=True)
    if fall_back and layers:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def use_cache_dir(cache: bool = True) -> str | None:
    """Point inductor's cache at gradflow's (unless the user set TORCHINDUCTOR_CACHE_DIR, or caching is off);
    the directory compiled kernels will be read from and written to, or None when torch's default is left."""
    if not cache or not caches.enabled():
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", caches.compile_dir())  # read when inductor first compiles
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def apply(model, asked: str, device: str, *, cache: bool = True) -> dict:
    """Compile when --compile asks for it; what was done and why, for the report."""
    on, why = resolve(asked, device)
    if not on:
        return {"compiled": False, "layers": 0, "why": why}
    use_cache_dir(cache)
    count = compile_layers(model, fall_back=asked == "auto")
    if count == 0:
        return {"compiled": False, "layers": 0, "why": "the model has no transformers decoder layers to compile"}
    return {"compiled": True, "layers": count, "why": why}
