#!/usr/bin/env bash
# gradflow train at a real size on one GPU, stopped by SIGTERM (what schedulers send) and resumed; then resumed again
# once complete. Usage (device machine, repo root, wheels for bitsandbytes and Typer installed).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
OUT=${RUN_DIR:-/tmp/gf_resume}
ARGS=(phi3.5-mini-shape --data gradflow/data/think_demo.jsonl --output "$OUT" --quant 4bit --dtype bfloat16
      --precision bf16 --gc non-reentrant --lora-r 16 --max-steps 8 --batch-size 4 --seq-len 512 --save-steps 2)
rm -rf "$OUT"
echo "\$ gradflow train ${ARGS[*]}   (SIGTERM after the first checkpoint)"
python3 -m gradflow.cli train "${ARGS[@]}" &
pid=$!
for _ in $(seq 600); do compgen -G "$OUT/checkpoints/*" >/dev/null && break; sleep 0.5; done
ls "$OUT/checkpoints"
kill -TERM "$pid"; wait "$pid"; echo "[exit $?]"
echo "\$ gradflow train ... --resume"
python3 -m gradflow.cli train "${ARGS[@]}" --resume; echo "[exit $?]"
echo "\$ gradflow train ... --resume   (again, on the finished run)"
python3 -m gradflow.cli train "${ARGS[@]}" --resume; echo "[exit $?]"
echo "\$ gradflow train ... --resume --seed 1   (a different run)"
python3 -m gradflow.cli train "${ARGS[@]}" --resume --seed 1; echo "[exit $?]"
