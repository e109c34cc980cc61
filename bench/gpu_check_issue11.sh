#!/usr/bin/env bash
# Issue 11's commands once on a GPU at a real size (Phi-3.5-mini shape, random init, built on the GPU), 4-bit
# included, under torchrun with nccl. On a 1-GPU machine it runs world size 1 (the nccl and CUDA paths, not the
# gathering); with NPROC=2 on a 2-GPU machine, the real thing plus the 1 -> 2 GPU tokens/s of train under DDP and FSDP.
# Usage (device machine, repo root, wheels installed): NPROC=1 bash bench/gpu_check_issue11.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
N=${NPROC:-1}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M=phi3.5-mini-shape
S="--dtype bfloat16 --lora-r 16 --lora-targets all-linear --seq-len 512 --batch-size 2 --gc non-reentrant"
tr() { echo >&2; echo "\$ torchrun --nproc-per-node $N -m gradflow $*" >&2
       /usr/bin/time -f "[wall %es, max RSS %MKB]" "$PY" -m torch.distributed.run --nproc-per-node "$N" --master-port $((29500 + RANDOM % 1000)) \
         -m gradflow "$@"; echo "[exit $?]" >&2; }
tr probe-backward $M $S --ddp
tr probe-backward $M $S --fsdp --format json | "$PY" -c "import json,sys; d=json.load(sys.stdin); print('fsdp', d.get('distributed'), d['params']['trainable'], [f['slug'] for f in d['findings']])"
tr probe-backward $M $S --quant 4bit --ddp
T="--data gradflow/data/think_demo.jsonl --dtype bfloat16 --precision bf16 --lora-r 16 --max-steps 6 --seq-len 512 --save-steps 3 --logging-steps 2"
tr train $M $T --output /tmp/gf_ddp
tr train $M $T --output /tmp/gf_fsdp --fsdp
tr train $M $T --output /tmp/gf_q4 --quant 4bit
for d in gf_ddp gf_fsdp gf_q4; do
  "$PY" -c "import json; d=json.load(open('/tmp/$d/report.json')); t=d['train']; print('$d', t['status'], t.get('tokens_per_second'), t.get('compile'), d.get('distributed'))"
done
