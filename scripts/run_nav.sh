#!/usr/bin/env bash
# The navigation pipeline with the paper's hyperparameters (Table 4, didactic column):
#   Algorithm 3 data set  ->  stage 1 (EM clustering, Algorithm 1)  ->  stage 2 (PPO per cluster, Algorithm 2)
#   ->  stage 3 (high-level IQL, ID(s), the final policy and its evaluation)
# Each stage prints its progress and wall time; outputs and TensorBoard logs go to $RUN.
#   RUN=runs/nav SEEDS=2 bash scripts/run_nav.sh
# SEED=3 SEEDS=8 runs seeds 3..10 (to add seeds to a run of seeds 1..2; scripts/table1.py joins the files).
# Run again after an interruption: finished stages (their output exists) are skipped and the interrupted
# one resumes from its last checkpoint. Delete a stage's output to run it again.
# Extra flags per stage (e.g. a short schedule for a smoke test) go in DATA_ARGS, CLUSTER_ARGS, PPO_ARGS
# and HIGHLEVEL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/nav}
SEEDS=${SEEDS:-2}          # seeds run in parallel, one per CPU core (or GPU)
SEED=${SEED:-1}            # seed of the first run; run i uses SEED + i
DATA=${DATA:-data/nav.npz}
read -r -a data_args <<< "${DATA_ARGS:-}"
read -r -a cluster_args <<< "${CLUSTER_ARGS:-}"
read -r -a ppo_args <<< "${PPO_ARGS:-}"
read -r -a highlevel_args <<< "${HIGHLEVEL_ARGS:-}"
mkdir -p "$RUN"
. scripts/step.sh  # step NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, reports its wall time
step data "$DATA" python nav_env.py --out "$DATA" --figure "$RUN/dataset.png" "${data_args[@]}"
step cluster "$RUN/cluster.npz" python empo_cluster.py --dataset "$DATA" --out "$RUN/cluster.npz" \
  --seed "$SEED" --num-seeds "$SEEDS" --resume "${cluster_args[@]}"
step ppo "$RUN/ppo.npz" python empo_ppo.py --dataset "$DATA" --cluster "$RUN/cluster.npz" --out "$RUN/ppo.npz" \
  --seed "$SEED" --num-seeds "$SEEDS" --resume "${ppo_args[@]}"
step highlevel "$RUN/highlevel.npz" python empo_highlevel.py --dataset "$DATA" --cluster "$RUN/cluster.npz" \
  --ppo "$RUN/ppo.npz" --out "$RUN/highlevel.npz" --seed "$SEED" \
  --num-seeds "$SEEDS" --resume "${highlevel_args[@]}"
echo "Done. Outputs in $RUN; curves: tensorboard --logdir $RUN"
