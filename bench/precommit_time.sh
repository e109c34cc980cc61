#!/usr/bin/env bash
# Time a real `pre-commit run` of gradflow's hooks on a throw-away git repository, cold and warm.
#
#   bash bench/precommit_time.sh [HOOK ...]        (default: gradflow gradflow-isolated)
#
# cold: an empty PRE_COMMIT_HOME, so pre-commit clones this repository at HEAD and, for gradflow-isolated, builds
# its environment (pip install of the repository and its dependencies, torch included); warm: the same run again.
# The hook's args are `tiny-llama --fail-on warning` (one CPU forward and backward of a preset).
# pre-commit goes into a scratch venv under $WORK. The `gradflow` hook (language: system) runs the gradflow found on
# PATH: GRADFLOW_BIN (default .venv/bin) is put first. Only committed files count (pre-commit clones HEAD).
# Prints one line per run and, for gradflow-isolated, the environment's size, its torch build and nvidia packages.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d -t gradflow-precommit-XXXXXX)}
GRADFLOW_BIN=${GRADFLOW_BIN:-$ROOT/.venv/bin}
REV=$(git -C "$ROOT" rev-parse HEAD)
HOOKS=("$@")
[ ${#HOOKS[@]} -gt 0 ] || HOOKS=(gradflow gradflow-isolated)

python3 -m venv "$WORK/pc" && "$WORK/pc/bin/pip" install --quiet pre-commit || exit 2
echo "pre-commit $("$WORK/pc/bin/pre-commit" --version | cut -d' ' -f2), $ROOT at ${REV:0:10}, work dir $WORK"

for hook in "${HOOKS[@]}"; do
  project="$WORK/project-$hook" home="$WORK/home-$hook"
  mkdir -p "$project"
  cat > "$project/.pre-commit-config.yaml" <<YAML
repos:
  - repo: $ROOT
    rev: $REV
    hooks:
      - id: $hook
        args: [tiny-llama, --fail-on, warning]
YAML
  echo "MODEL = 'tiny-llama'" > "$project/train_setup.py"
  git -C "$project" init -q && git -C "$project" add .
  for round in cold warm; do
    start=$(date +%s.%N)
    (cd "$project" && PATH="$GRADFLOW_BIN:$PATH" PRE_COMMIT_HOME="$home" "$WORK/pc/bin/pre-commit" run) \
      > "$WORK/$hook-$round.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%-18s %-4s exit %d  %6.1f s   (log: %s)\n' "$hook" "$round" "$rc" "$(python3 -c "print($end - $start)")" \
      "$WORK/$hook-$round.log"
  done
  env_python=$(ls -d "$home"/repo*/py_env-*/bin/python 2>/dev/null | head -1)
  if [ -n "$env_python" ]; then
    echo "  environment: $(du -sh "$home" | cut -f1); torch $("$env_python" -c 'import torch; print(torch.__version__)');" \
      "nvidia-* packages: $("$env_python" -m pip list 2>/dev/null | grep -ci '^nvidia-')"
  fi
done
