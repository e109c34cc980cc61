#!/usr/bin/env bash
# Issue 19's GPU measurements, one part per device call (each part fits the 600 s limit of one call on an H100;
# every run inside a part is side by side on one machine, at one commit). Results land in $OUT (or bench/results).
# Usage (device machine, repo root, wheels installed: bitsandbytes, trl, datasets, dill, multiprocess, liger-kernel):
#   GRADFLOW_COMMIT=<sha> bash bench/gpu_check_issue19.sh lora|qlora|peers|qlora-peers|warm|leftovers|watch|docs
# The device call (carry [".whl", ".whl-unsloth"]; the second only for the peers parts, 46 MB together):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-unsloth \
#     .whl-unsloth/*.whl && export PYTHONPATH=/tmp/site GRADFLOW_BENCH_UNSLOTH_SITE=/tmp/site-unsloth && ...
# .whl-unsloth: the wheels of requirements-peers.txt's unsloth list that the device image lacks (it has
# transformers 5.17, which unsloth's pins allow), with bitsandbytes' CUDA 11/12 and ROCm libraries and unsloth's
# studio/ web UI left out of their wheels (13 and 33 MB instead of 43 and 29: a call carries 64 MiB).
# The order that spends device time best: lora, qlora (the goals: to step 1, whole run, peaks), peers and
# qlora-peers, then leftovers and watch (issue 9's), then docs (CPU only: docs/benchmarks.md's tables from the one
# results file). Between calls,
# copy the returned train_compare_<GPU>.json into bench/results/: the next part merges its mode into that file.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
OUT=${OUT:-bench/results}
GPU=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print(next((k for k in ('H200','H100') if k in n), 'gpu'))" 2>/dev/null || echo cpu)
TC="python3 bench/train_compare.py --results-dir $OUT --timeout 185"  # a run past 185 s misses the goals anyway
case "${1:-}" in lora|qlora|peers|qlora-peers|warm|leftovers|watch|docs) ;;
  *) echo "usage: bash bench/gpu_check_issue19.sh lora|qlora|peers|qlora-peers|warm|leftovers|watch|docs" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
case "${1:-}" in
  lora)      timeout 590 $TC --only a,a-gc,d ;;              # at c308b99: 185 + 118 + 119 s on an H100 (issue 19's table)
  qlora)     timeout 590 $TC --qlora --only a,a-gc,d ;;
  # the peers beside their own d, in a table of their own (mode lora-peers / qlora-peers): unsloth runs from
  # GRADFLOW_BENCH_UNSLOTH_SITE (its pins need trl 1.15 / datasets 4.x, bench/requirements-peers.txt)
  peers)       timeout 590 $TC --tag peers --only d,d-liger,unsloth ;;
  qlora-peers) timeout 590 $TC --qlora --tag peers --only d,d-liger,unsloth ;;
  warm)      timeout 280 $TC --cache warm --only a-gc && timeout 280 $TC --cache warm --only a-gc ;;  # the second is warm
  leftovers) timeout 580 $TC --only a-ce,a-eager,a-gc-eager ;;
  watch)     timeout 400 python3 bench/watch_overhead.py --tokens 8192 --steps 50 --compile --json "$OUT/watch_overhead_$GPU.json" ;;
  docs)      python3 bench/train_compare.py --docs-from "$OUT/train_compare_$GPU.json" ;;
esac
