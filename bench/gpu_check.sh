#!/usr/bin/env bash
# Run gradflow's commands once on a GPU at a real size: a Phi-3.5-mini-shaped model, random init, built on the GPU.
# Usage (device machine, repo root): bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
gf() { echo; echo "\$ gradflow $*"; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow.cli "$@"; echo "[exit $?]"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
M=phi3.5-mini-shape
gf inspect gradflow.demos:seed_bug_phi35 --depth 3
gf probe-backward gradflow.demos:seed_bug_phi35_4bit
gf patch gradflow.demos:seed_bug_phi35_4bit
gf probe-backward $M --dtype bfloat16 --lora-r 16 --quant 4bit --gc reentrant --device auto --seq-len 512 --batch-size 2
gf train $M --data gradflow/data/think_demo.jsonl --output /tmp/gf_run --quant 4bit --dtype bfloat16 --precision bf16 \
   --gc non-reentrant --lora-r 16 --max-steps 8 --batch-size 4 --seq-len 512 --logging-steps 2 --save-steps 4
ls -la /tmp/gf_run 2>/dev/null
