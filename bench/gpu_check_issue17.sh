#!/usr/bin/env bash
# Issue 17's changed commands once on a GPU at a real size (Phi-3.5-mini shape, random init, built on the GPU), 4-bit
# included: inspect, probe-backward (and --dry-run), patch (and --plan-only), train (SO(8) as a setup option; issue 21:
# a pipe, --think-lenient, --resume), and the Python entries that the
# CLI now calls (gradflow.probe / gradflow.patch of a MODEL spec with setup=...).
# Usage (device machine, repo root, wheels installed): bash bench/gpu_check_issue17.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
gf() { echo >&2; echo "\$ gradflow $*" >&2; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow "$@"; echo "[exit $?]" >&2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, typer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'typer', typer.__version__)"
M=phi3.5-mini-shape
S="--dtype bfloat16 --lora-r 16 --lora-targets all-linear --seq-len 512 --batch-size 2"
gf probe-backward $M $S --quant 4bit --gc reentrant --dry-run --format json | python3 -c "import json,sys; d=json.load(sys.stdin); print('dry run:', d['model']['params_total'], [f['slug'] for f in d['findings']])"
gf patch gradflow.demos:seed_bug_phi35_4bit --plan-only --format json | python3 -c "import json,sys; d=json.load(sys.stdin); print('plan:', [p['id'] for p in d['plan']], 'after', d['after'])"
gf probe-backward $M $S --quant 4bit --gc reentrant
gf inspect $M $S --quant 4bit --gc reentrant --depth 2
gf patch gradflow.demos:seed_bug_phi35_4bit
echo; echo '$ python: gradflow.probe / gradflow.patch of a MODEL spec (SO(8) rotations as a setup option)'
/usr/bin/time -f "[wall %es, max RSS %MKB]" python3 - <<'PY'
import gradflow
from gradflow import SetupOptions
opts = SetupOptions(lora_r=16, lora_targets="all-linear", quant="4bit", gc="reentrant", dtype="bfloat16", so8_layers=[4, 5])
r = gradflow.probe("phi3.5-mini-shape", setup=opts, seq_len=512, batch_size=2)
print("probe:", r.model["class"], r.params["trainable"], r.params["with_grad"], [f.slug for f in r.findings])
p = gradflow.patch("phi3.5-mini-shape", setup=SetupOptions(lora_r=16, quant="4bit", gc="reentrant", dtype="bfloat16"), seq_len=512)
print("patch:", [f["id"] for f in p.fixes_applied], "verified", p.patch.verification["ok"], [f.slug for f in p.findings])
PY
gf train $M --data gradflow/data/think_demo.jsonl --output /tmp/gf_run --quant 4bit --dtype bfloat16 --precision bf16 \
   --lora-r 16 --so8-layers 4,5 --max-steps 4 --batch-size 4 --seq-len 512 --logging-steps 2 --save-steps 2 --compile off
python3 -c "import json; d=json.load(open('/tmp/gf_run/report.json')); t=d['train']; print('train', t['status'], t['steps'], t.get('loss_first'), t.get('loss_last'), t['options']['so8_layers'], t['gradients'].get('params_moved'), '/', t['gradients'].get('params_trainable'))"
# issue 21 on the GPU: --data through a pipe with --think-lenient, then --resume of it with the same bytes (complete,
# nothing to do) and with other bytes (refused, one line)
gf train $M --data <(cat gradflow/data/think_demo.jsonl) --output /tmp/gf_pipe --quant 4bit --dtype bfloat16 \
   --precision bf16 --lora-r 16 --max-steps 2 --batch-size 4 --seq-len 512 --save-steps 1 --compile off --think-lenient -q
gf train $M --data <(cat gradflow/data/think_demo.jsonl) --output /tmp/gf_pipe --quant 4bit --dtype bfloat16 \
   --precision bf16 --lora-r 16 --max-steps 2 --batch-size 4 --seq-len 512 --save-steps 1 --compile off --think-lenient --resume
gf train $M --data <(head -5 gradflow/data/think_demo.jsonl) --output /tmp/gf_pipe --quant 4bit --dtype bfloat16 \
   --precision bf16 --lora-r 16 --max-steps 2 --batch-size 4 --seq-len 512 --save-steps 1 --compile off --think-lenient --resume
