#!/usr/bin/env bash
# The navigation pipeline with the paper's hyperparameters (Table 4, didactic column):
#   Algorithm 3 data set  ->  stage 1 (EM clustering, Algorithm 1)  ->  stage 2 (PPO per cluster, Algorithm 2)
#   ->  stage 3 (high-level IQL, ID(s), the final policy and its evaluation)
# Each stage prints its progress and wall time; outputs and TensorBoard logs go to $RUN.
#   RUN=runs/nav SEEDS=2 bash scripts/run_nav.sh
# Extra flags per stage (e.g. a short schedule for a smoke test) go in DATA_ARGS, CLUSTER_ARGS, PPO_ARGS
# and HIGHLEVEL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/nav}
SEEDS=${SEEDS:-2}          # seeds run in parallel, one per CPU core (or GPU)
DATA=${DATA:-data/nav.npz}
read -r -a data_args <<< "${DATA_ARGS:-}"
read -r -a cluster_args <<< "${CLUSTER_ARGS:-}"
read -r -a ppo_args <<< "${PPO_ARGS:-}"
read -r -a highlevel_args <<< "${HIGHLEVEL_ARGS:-}"
mkdir -p "$RUN"
stage() {  # stage NAME COMMAND...: run one stage and report its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"
  echo "=== $name took $((SECONDS - t0)) s"
}
[ -f "$DATA" ] || stage data python nav_env.py --out "$DATA" --figure "$RUN/dataset.png" "${data_args[@]}"
stage cluster python empo_cluster.py --dataset "$DATA" --out "$RUN/cluster.npz" --num-seeds "$SEEDS" "${cluster_args[@]}"
stage ppo python empo_ppo.py --dataset "$DATA" --cluster "$RUN/cluster.npz" --out "$RUN/ppo.npz" \
  --num-seeds "$SEEDS" "${ppo_args[@]}"
stage highlevel python empo_highlevel.py --dataset "$DATA" --cluster "$RUN/cluster.npz" --ppo "$RUN/ppo.npz" \
  --out "$RUN/highlevel.npz" --num-seeds "$SEEDS" "${highlevel_args[@]}"
echo "Done. Outputs in $RUN; curves: tensorboard --logdir $RUN"
