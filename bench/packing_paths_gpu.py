"""Which attention paths keep packed-sample boundaries on a GPU: one command, prints a table and writes JSON.

    python bench/packing_paths_gpu.py [--out bench/results/packing_paths.json]

Needs torch with CUDA, transformers, peft (flash_attention_2 is tried only when flash-attn is installed). For each
preset (tiny-llama, tiny-phi3), attention implementation (sdpa, eager, flex_attention, flash_attention_2) and cache
setting it runs gradflow's packed-attention-leak measurement and compares the packed loss and LoRA gradients with
the per-sample padded computation (bf16 and fp32). CPU cannot run flex_attention's backward or flash attention,
so these paths are only checked here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from gradflow.data.jsonl import collate
    from gradflow.probing.leak import measure
    from gradflow.data.packing import collate_packed, supervised_tokens
    from gradflow.setup.presets import build_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/packing_paths.json")
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu only to try the script")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (37, 21, 64, 9):
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    impls = ["sdpa", "eager", "flex_attention"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        pass
    results = []
    for preset in ("tiny-llama", "tiny-phi3"):
        for impl in impls:
            for dtype in (torch.float32, torch.bfloat16):
                for use_cache in (False, True):
                    rec = {"preset": preset, "impl": impl, "dtype": str(dtype), "use_cache": use_cache}
                    try:
                        model = build_preset(preset, dtype=dtype, device=dev, seed=1)
                        model.set_attn_implementation(impl)
                        model.config.use_cache = use_cache
                        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                 init_lora_weights=False)).train()
                        packed = {k: v.to(dev) for k, v in collate_packed(rows).items()}
                        padded = {k: v.to(dev) for k, v in collate(rows, 0).items()}
                        n_items = torch.tensor(supervised_tokens(padded), device=dev)
                        leak = measure(model, packed)
                        rec.update(leaks=len(leak.leaks), checked=leak.checked, max_ratio=leak.max_ratio,
                                   causes=leak.causes, leak_error=leak.error)
                        grads = []
                        for batch in (padded, packed):
                            model.zero_grad(set_to_none=True)
                            out = model(**batch, num_items_in_batch=n_items)
                            out.loss.backward()
                            grads.append((float(out.loss), {n: p.grad.detach().float().clone()
                                                            for n, p in model.named_parameters() if p.requires_grad}))
                        (lp, gp), (lk, gk) = grads
                        rec["loss_padded"], rec["loss_packed"] = lp, lk
                        rec["grad_max_rel"] = max(float((gk[n] - g).norm() / g.norm().clamp_min(1e-30))
                                                  for n, g in gp.items())
                    except Exception as exc:  # a path missing on this machine is a result too
                        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    results.append(rec)
                    print(json.dumps(rec), flush=True)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else (platform.processor() or "cpu")
    out = {"device": name, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
