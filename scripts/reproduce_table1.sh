#!/usr/bin/env bash
# Table 1 and Figures 3/5 of the paper on the navigation task: EMPO with K = 2, TD3+BC in four settings
# (raw action units and units of a_max, each with Table 4's gamma 0.999 and the reference code's 0.99),
# EMPO with K = 1 and BC, SEEDS seeds each and 10 rollouts per seed (Appendix C), both evaluation protocols
# (sampled and mean actions), every schedule at its default (the paper's Table 4 for EMPO). Then
# scripts/table1.py writes $RUN/table1.md and $RUN/table1.png.
#   RUN=runs/table1 SEEDS=10 bash scripts/reproduce_table1.sh
# EMPO K = 1 is stages 1 and 2 with one cluster; its row is pi_L(.|s, 0) itself, which is what stage 3
# would execute (ID(s) = {0} everywhere), so stage 3 is not run for it.
# Run again after an interruption: finished steps (their output exists) are skipped and the interrupted
# one resumes from its checkpoint. EMPO K = 2 is the main pipeline (scripts/run_nav.sh with RUN=$RUN/k2), so
# an existing run of it can be linked there. Extra flags per script (for a smoke test): DATA_ARGS,
# CLUSTER_ARGS, PPO_ARGS, HIGHLEVEL_ARGS (as for run_nav.sh; the first two serve K = 1 too), BC_ARGS, TD3_BC_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/table1}
SEEDS=${SEEDS:-10}
SEED=${SEED:-1}   # seed of the first run; SEED=3 SEEDS=8 adds seeds 3..10 to a run of seeds 1..2
DATA=${DATA:-data/nav.npz}
for name in CLUSTER PPO BC TD3_BC; do
  var="${name}_ARGS"; read -r -a "${name,,}_args" <<< "${!var:-}"
done
mkdir -p "$RUN"/{k1,bc,td3_bc,td3_bc_099,td3_bc_norm,td3_bc_norm_099}
. scripts/step.sh  # step NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, reports its wall time
echo "=== EMPO K=2: the main pipeline, scripts/run_nav.sh, in $RUN/k2"
RUN="$RUN/k2" SEED="$SEED" SEEDS="$SEEDS" DATA="$DATA" bash scripts/run_nav.sh
step "TD3+BC raw units" "$RUN/td3_bc/td3_bc.npz" python baselines/td3_bc.py --dataset "$DATA" \
  --out "$RUN/td3_bc/td3_bc.npz" --seed "$SEED" --num-seeds "$SEEDS" --eval-episodes 10 --resume "${td3_bc_args[@]}"
step "TD3+BC a/a_max units" "$RUN/td3_bc_norm/td3_bc.npz" python baselines/td3_bc.py --dataset "$DATA" \
  --out "$RUN/td3_bc_norm/td3_bc.npz" --action-units normalised --seed "$SEED" --num-seeds "$SEEDS" \
  --eval-episodes 10 --resume "${td3_bc_args[@]}"
step "TD3+BC a/a_max units gamma 0.99" "$RUN/td3_bc_norm_099/td3_bc.npz" python baselines/td3_bc.py \
  --dataset "$DATA" --out "$RUN/td3_bc_norm_099/td3_bc.npz" --action-units normalised --gamma 0.99 --seed "$SEED" \
  --num-seeds "$SEEDS" --eval-episodes 10 --resume "${td3_bc_args[@]}"
step "TD3+BC raw units gamma 0.99" "$RUN/td3_bc_099/td3_bc.npz" python baselines/td3_bc.py --dataset "$DATA" \
  --out "$RUN/td3_bc_099/td3_bc.npz" --gamma 0.99 --seed "$SEED" --num-seeds "$SEEDS" --eval-episodes 10 --resume \
  "${td3_bc_args[@]}"
dir="$RUN/k1"
step "EMPO K=1 stage 1" "$dir/cluster.npz" python empo_cluster.py --dataset "$DATA" --out "$dir/cluster.npz" \
  --k 1 --seed "$SEED" --num-seeds "$SEEDS" --resume "${cluster_args[@]}"
step "EMPO K=1 stage 2" "$dir/ppo.npz" python empo_ppo.py --dataset "$DATA" --cluster "$dir/cluster.npz" \
  --out "$dir/ppo.npz" --seed "$SEED" --num-seeds "$SEEDS" --eval-episodes 10 --resume "${ppo_args[@]}"
step BC "$RUN/bc/bc.npz" python baselines/bc.py --dataset "$DATA" --out "$RUN/bc/bc.npz" --seed "$SEED" --num-seeds "$SEEDS" \
  --eval-episodes 10 --resume "${bc_args[@]}"
python scripts/table1.py --bc "$RUN/bc/bc.npz" --td3-bc "$RUN/td3_bc/td3_bc.npz" --td3-bc-099 "$RUN/td3_bc_099/td3_bc.npz" \
  --td3-bc-norm "$RUN/td3_bc_norm/td3_bc.npz" --td3-bc-norm-099 "$RUN/td3_bc_norm_099/td3_bc.npz" \
  --empo-k1 "$RUN/k1/ppo.npz" --empo-k2 "$RUN/k2/highlevel.npz" --dataset "$DATA" --out "$RUN/table1"
echo "Done. Curves: tensorboard --logdir $RUN"
