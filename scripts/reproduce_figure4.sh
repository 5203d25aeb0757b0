#!/usr/bin/env bash
# Figure 4 of the paper (§4.3.2) on the navigation task: full-batch against minibatch (B = 256) PPO for
# N_pi in {1, 2, 5, 10, 20, 50, 100}, K = 2, SEEDS seeds. Both arms improve the same stage-1 runs
# (CLUSTER, by default Table 1's K = 2 run) with the same seeds, so their Q and V are the same networks;
# one run of N_pi = 100 per arm, evaluated at every N_pi of the sweep (empo_ppo.py --eval-at).
#   RUN=runs/figure4 SEEDS=4 bash scripts/reproduce_figure4.sh
# SEEDS defaults to 4: vmapped seeds are spread over the host's devices only when they divide evenly,
# so on 2 cores 4 seeds (2 per core) run faster than 3 (all on one device): a SARSA unit took 3.0 s
# against 5.3 s.
# Run again after an interruption: finished arms are skipped, the interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/figure4}
SEEDS=${SEEDS:-4}
DATA=${DATA:-data/nav.npz}
CLUSTER=${CLUSTER:-runs/table1/k2/cluster.npz}
EVAL_AT=${EVAL_AT:-1,2,5,10,20,50,100}
read -r -a ppo_args <<< "${PPO_ARGS:-}"
mkdir -p "$RUN"/{full,mb256}
. scripts/step.sh  # step NAME OUTPUT COMMAND...: runs COMMAND unless OUTPUT exists, reports its wall time
for arm in full mb256; do
  extra=(); [ "$arm" = mb256 ] && extra=(--ppo-minibatch 256)
  step "$arm" "$RUN/$arm/ppo.npz" python empo_ppo.py --dataset "$DATA" --cluster "$CLUSTER" --out "$RUN/$arm/ppo.npz" \
    --seed 1 --num-seeds "$SEEDS" --pi-epochs "${EVAL_AT##*,}" --eval-at "$EVAL_AT" --eval-episodes 10 --resume \
    "${extra[@]}" "${ppo_args[@]}"
done
python scripts/figure4.py --full "$RUN/full/ppo.npz" --minibatch "$RUN/mb256/ppo.npz" --out "${OUT:-docs/figure4}"
