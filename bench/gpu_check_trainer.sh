#!/usr/bin/env bash
# A Trainer as MODEL at a real size on one GPU: probe-backward / patch / inspect on Phi-3.5-mini-shaped Trainers.
# Usage (device machine, repo root, wheels for bitsandbytes and Typer installed): bash bench/gpu_check_trainer.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
gf() { echo >&2; echo "\$ gradflow $*" >&2; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow.cli "$@"; echo "[exit $?]" >&2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
F=bench/trainer_factories.py
gf probe-backward $F:healthy_4bit
gf probe-backward $F:reentrant_4bit --format json | python3 -c "import json,sys; d=json.load(sys.stdin); print('findings', [(f['slug'], f['location']) for f in d['findings']], 'params', {k: d['params'][k] for k in ('trainable','with_grad','none_grad')}, 'gc', d['model']['gradient_checkpointing'])"
gf probe-backward $F:optimizer_misses_lora_b_bf16
gf patch $F:reentrant_4bit
gf inspect $F:healthy_4bit --depth 2
