#!/usr/bin/env bash
# Run gradflow's commands once on a GPU at a real size: a Phi-3.5-mini-shaped model, random init, built on the GPU.
# Usage (device machine, repo root): bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
gf() { echo "\$ gradflow $*"; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow.cli "$@"; echo "[exit $?]"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
M=phi3.5-mini-shape
gf inspect $M --dtype bfloat16 --lora-r 16 --gc reentrant --device auto --depth 3
gf probe-backward $M --dtype bfloat16 --lora-r 16 --gc reentrant --device auto --seq-len 512 --batch-size 2
gf probe-backward $M --dtype bfloat16 --lora-r 16 --quant 4bit --gc reentrant --device auto --seq-len 512 --batch-size 2
