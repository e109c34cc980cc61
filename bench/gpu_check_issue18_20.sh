#!/usr/bin/env bash
# Issues 18 and 20's changed commands once on a GPU at a real size (Phi-3.5-mini shape, random init, built on the
# GPU, 4-bit): issue 18's findings from bench/gpu_factories.py (a detached loss term; layers under no_grad), SARIF
# with a baseline (written, then compared: new and fixed), the demo patch at 80 columns with its kbit wording, a
# MoE dry run, and train with --verbose (issue 19's startup profile).
# Usage (device machine, repo root, wheels installed): [QUICK=1] bash bench/gpu_check_issue18_20.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD COLUMNS=80
gf() { echo >&2; echo "\$ gradflow $*" >&2; /usr/bin/time -f "[wall %es, max RSS %MKB]" python3 -m gradflow "$@"; echo "[exit $?]" >&2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, typer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'typer', typer.__version__)"
echo; echo '$ python bench/probe_overhead.py (issue 18 goal: the probe within 1.10x a plain step)'
timeout 200 python3 bench/probe_overhead.py --iters 5
F=bench/gpu_factories.py
gf probe-backward $F:aux_term_detached --baseline /tmp/gf_base.json
gf probe-backward $F:lower_layers_no_grad --baseline /tmp/gf_base.json --format sarif > /tmp/b.sarif
python3 - <<'PY'
import json
for name in ("/tmp/b.sarif",):
    run = json.load(open(name))["runs"][0]
    print(name, [(r["ruleId"], r.get("baselineState"), r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
                  r["locations"][0]["physicalLocation"].get("region", {}).get("startLine")) for r in run["results"]])
PY
gf patch gradflow.demos:seed_bug_phi35_4bit
gf inspect phi3.5-mini-shape --dtype bfloat16 --lora-r 16 --quant 4bit --gc non-reentrant --seq-len 512 --depth 2 --format json | python3 -c "import json,sys; d=json.load(sys.stdin); print('inspect json parses:', d['model']['class'], [f['slug'] for f in d['findings']])"
[ "${QUICK:-0}" = 1 ] && exit 0  # QUICK=1: issues 18 and 20 only (the dry run is CPU work; train is issue 19's)
gf probe-backward bench/configs/qwen3-235b-a22b.json --dry-run --lora-r 16 --lora-targets all-linear --gc reentrant --format json | python3 -c "import json,sys; d=json.load(sys.stdin); print('dry run:', d['model']['params_total'], [f['slug'] for f in d['findings']])"
for i in 1; do
gf train phi3.5-mini-shape --data gradflow/data/think_demo.jsonl --output /tmp/gf_run$i --quant 4bit --dtype bfloat16 \
   --precision bf16 --lora-r 16 --max-steps 2 --batch-size 4 --seq-len 512 --logging-steps 1 --compile off --verbose
done
python3 -c "import json; d=json.load(open('/tmp/gf_run1/report.json')); t=d['train']; print('startup', json.dumps(t.get('startup')))"
