#!/usr/bin/env bash
# Train the SAC behaviour policies of D4RL's three locomotion tasks, one after another: hopper, walker2d,
# halfcheetah (docs/sac.md).
#
#   behaviour/train_all.sh [extra flags for behaviour/sac.py, e.g. --total-steps 3000000]
#
# Each task writes runs/behaviour/<task>/sac.npz (the expert = the final actor, and the snapshots the medium policy
# is chosen from) with its TensorBoard logs beside it and its output in runs/behaviour/<task>/train.log. Run it
# again after an interruption: a task whose sac.npz exists is skipped, an unfinished one continues from its
# checkpoint (--resume; a task without a checkpoint starts from the beginning). RUNS changes the folder, PYTHON
# the interpreter. It stops at the first task that fails. In the background, from the repository root:
#
#   nohup behaviour/train_all.sh > runs/behaviour/train_all.log 2>&1 &
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/behaviour}
PYTHON=${PYTHON:-python}

for pair in hopper:Hopper-v4 walker2d:Walker2d-v4 halfcheetah:HalfCheetah-v4; do  # the issue's order
    task=${pair%%:*}
    env_id=${pair#*:}
    out="$RUNS/$task/sac.npz"
    if [[ -f "$out" ]]; then
        echo "[train_all] $task: $out exists, skipped"
        continue
    fi
    mkdir -p "$RUNS/$task"
    echo "[train_all] $task ($env_id): training, log in $RUNS/$task/train.log ($(date -u +%FT%TZ))"
    nice -n 10 "$PYTHON" behaviour/sac.py --env-id "$env_id" --out "$out" --resume "$@" >> "$RUNS/$task/train.log" 2>&1
    echo "[train_all] $task: wrote $out ($(date -u +%FT%TZ))"
done
