#!/usr/bin/env bash
# Table 2 (normalised scores) and Table 3's "Ours" column (rand index of stage 1) of the paper: EMPO and the
# baselines BC, TD3+BC and IQL on halfcheetah, hopper and walker2d medium-expert v2 data, SEEDS seeds per task, each
# at its D4RL preset (EMPO: Table 4's D4RL column; the baselines: their reference code's settings); the final
# policies are evaluated in Gymnasium's HalfCheetah-v4 / Hopper-v4 / Walker2d-v4 with D4RL's reference scores. Then
# scripts/table2.py writes $RUN/table2.md and $RUN/table2.png.
#   D4RL_DIR=data/d4rl RUN=runs/table2 SEEDS=10 bash scripts/reproduce_table2.sh
# STEP_FRACTION scales every schedule counted in gradient steps (SARSA's 1.5M, stage 3's and the baselines' 1M)
# for a shorter run that gives every algorithm the same budget; schedules counted in epochs are passes over the
# data and stay (fewer rows make them shorter): STEP_FRACTION=0.05 with 50,000-row files is the CPU budget of
# docs/table2.md. BASELINES picks the baselines (default "bc td3_bc iql"; empty: EMPO alone).
# Data per task, from the folder D4RL_DIR (D4RL's own download folder, ~/.d4rl/datasets, works too):
#   {task}_medium-v2.hdf5 and {task}_expert-v2.hdf5, comma-joined: medium-expert with each row labelled by its
#   file, so stage 1's rand index is known; else {task}_medium_expert-v2.hdf5 alone (no labels: no rand index).
# SOURCE=minari reads Minari's mujoco/{task}/medium-v0 + expert-v0 instead (a different benchmark: docs/d4rl.md).
# The SEEDS seeds of a stage run in one vmapped call (10 fit one 80 GB GPU: docs/d4rl.md, "Memory on one GPU"). On
# a smaller one, run the seeds as groups in separate folders and join them: SEED=1 SEEDS=5 RUN=runs/table2a, then SEED=6
# SEEDS=5 RUN=runs/table2b, then python scripts/table2.py --runs runs/table2a,runs/table2b.
# Run again after an interruption: finished steps (their output exists) are skipped and the interrupted one
# resumes from its checkpoint. Extra flags per stage (e.g. a short schedule for a smoke test) go in
# CLUSTER_ARGS, PPO_ARGS, HIGHLEVEL_ARGS and BASELINE_ARGS (every baseline); TASKS picks tasks (default: all three).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/table2}
SEEDS=${SEEDS:-10}
SEED=${SEED:-1}            # seed of the first run; run i uses SEED + i
D4RL_DIR=${D4RL_DIR:-data/d4rl}
SOURCE=${SOURCE:-d4rl}
TASKS=${TASKS:-halfcheetah hopper walker2d}
BASELINES=${BASELINES-bc td3_bc iql}
STEP_FRACTION=${STEP_FRACTION:-1}
read -r -a cluster_args <<< "${CLUSTER_ARGS:-}"
read -r -a ppo_args <<< "${PPO_ARGS:-}"
read -r -a highlevel_args <<< "${HIGHLEVEL_ARGS:-}"
read -r -a baseline_args <<< "${BASELINE_ARGS:-}"
steps() {  # steps N: N x STEP_FRACTION, rounded, at least 1
  python -c "import math, sys; f = float(sys.argv[2]); assert math.isfinite(f) and f > 0
print(max(1, round(int(sys.argv[1]) * f)))" "$1" "$STEP_FRACTION" 2> /dev/null
}
for baseline in $BASELINES; do
  case $baseline in bc|td3_bc|iql) ;; *) echo "error: BASELINES holds '$baseline'; the baselines are bc, td3_bc and iql" >&2; exit 2;; esac
done
q_steps=$(steps 1500000) || { echo "error: STEP_FRACTION must be a positive number, got '$STEP_FRACTION'" >&2; exit 2; }
policy_steps=$(steps 1000000)
fraction=()  # the scaled schedules go before the extra flags, which still win
[ "$STEP_FRACTION" = 1 ] || fraction=(--steps "$policy_steps")
URL=http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2

dataset_of() {  # dataset_of TASK: the --dataset of one task, or an error that says what to download
  local task=$1 medium="$D4RL_DIR/${1}_medium-v2.hdf5" expert="$D4RL_DIR/${1}_expert-v2.hdf5"
  if [ "$SOURCE" = minari ]; then
    echo "mujoco/$task/medium-v0,mujoco/$task/expert-v0"
  elif [ -f "$medium" ] && [ -f "$expert" ]; then
    echo "$medium,$expert"
  elif [ -f "$D4RL_DIR/${task}_medium_expert-v2.hdf5" ]; then
    echo "note: $task: only ${task}_medium_expert-v2.hdf5 in $D4RL_DIR; its rows carry no behaviour label, so" \
         "stage 1's rand index is not computed (add ${task}_medium-v2.hdf5 and ${task}_expert-v2.hdf5)" >&2
    echo "$D4RL_DIR/${task}_medium_expert-v2.hdf5"
  else
    echo "error: $D4RL_DIR holds neither ${task}_medium-v2.hdf5 and ${task}_expert-v2.hdf5 nor" \
         "${task}_medium_expert-v2.hdf5; download them: wget -P $D4RL_DIR $URL/${task}_medium-v2.hdf5" \
         "$URL/${task}_expert-v2.hdf5" >&2
    return 1
  fi
}
. scripts/step.sh  # step NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, reports its wall time

declare -A data
for task in $TASKS; do  # every task's data is found before anything runs
  data[$task]=$(dataset_of "$task")
done
for task in $TASKS; do
  dir="$RUN/$task"
  mkdir -p "$dir"
  common=(--preset d4rl --dataset "${data[$task]}" --seed "$SEED" --num-seeds "$SEEDS" --resume)
  step "$task stage 1" "$dir/cluster.npz" python empo_cluster.py "${common[@]}" --out "$dir/cluster.npz" \
    "${cluster_args[@]}"
  q_fraction=()
  [ "$STEP_FRACTION" = 1 ] || q_fraction=(--q-steps "$q_steps")
  step "$task stage 2" "$dir/ppo.npz" python empo_ppo.py "${common[@]}" --cluster "$dir/cluster.npz" \
    --out "$dir/ppo.npz" "${q_fraction[@]}" "${ppo_args[@]}"
  step "$task stage 3" "$dir/highlevel.npz" python empo_highlevel.py "${common[@]}" --cluster "$dir/cluster.npz" \
    --ppo "$dir/ppo.npz" --out "$dir/highlevel.npz" "${fraction[@]}" "${highlevel_args[@]}"
  for baseline in $BASELINES; do
    step "$task $baseline" "$dir/$baseline.npz" python "baselines/$baseline.py" "${common[@]}" \
      --out "$dir/$baseline.npz" "${fraction[@]}" "${baseline_args[@]}"
  done
done
# shellcheck disable=SC2086  # TASKS is a list of words
python scripts/table2.py --runs "$RUN" --tasks $TASKS --out "$RUN/table2"
echo "Done. Curves: tensorboard --logdir $RUN"
