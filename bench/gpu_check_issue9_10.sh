#!/usr/bin/env bash
# The commands issues 9 and 10 added or changed, once on a GPU at a real size (Phi-3.5-mini shape, random init,
# built on the GPU), 4-bit included. Usage (device machine, repo root, wheels installed): bash bench/gpu_check_issue9_10.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
gf() { echo >&2; echo "\$ gradflow $*" >&2; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow "$@"; echo "[exit $?]" >&2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M=phi3.5-mini-shape
S="--dtype bfloat16 --lora-r 16 --lora-targets all-linear --device auto --seq-len 512 --batch-size 2"
gf probe-backward $M $S --quant 4bit --gc reentrant --packed
gf probe-backward $M $S --quant 4bit --gc non-reentrant --check-gc --steps 2
gf probe-backward $M $S --gc non-reentrant --packed --format sarif | python3 -c "import json,sys; d=json.load(sys.stdin); r=d['runs'][0]['results']; print('sarif results', len(r))"
python3 bench/dry_run_70b.py --runs 1 2>&1 | tail -6
gf train $M --data gradflow/data/think_demo.jsonl --output /tmp/gf_run4 --quant 4bit --dtype bfloat16 --precision bf16 \
   --lora-r 16 --max-steps 6 --batch-size 4 --seq-len 512 --logging-steps 2 --save-steps 3
python3 -c "import json; d=json.load(open('/tmp/gf_run4/report.json')); print('plan', json.dumps(d.get('plan'))[:600]); print('ce', d.get('train', {}).get('ce'))"
gf train $M --data gradflow/data/think_demo.jsonl --output /tmp/gf_run16 --dtype bfloat16 --precision bf16 \
   --lora-r 16 --max-steps 4 --batch-size 4 --seq-len 512 --logging-steps 2 --max-memory 12GiB -q
python3 -c "import json; d=json.load(open('/tmp/gf_run16/report.json')); print('plan@12GiB', json.dumps(d.get('plan'))[:600])"
