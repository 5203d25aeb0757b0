#!/usr/bin/env bash
# --k auto against ground truth: the navigation sets with one to five behaviours (Algorithm 3, nav_env.py
# --subgoals; 'start3': routes that share only the start, 'segment': two routes that differ in one short segment,
# 'unequal': the paper's two behaviours at 90 / 10 shares) and the local MuJoCo controller set (two
# behaviours), then scripts/select_k_table.py writes $RUN/select_k.md (chosen K, each seed's own choice, rand
# index, the gap to the best K in standard errors, time; the wall time of each command is appended to
# $RUN/times.txt as 'NAME auto|fixed SECONDS').
#   RUN=runs/select_k bash scripts/reproduce_select_k.sh               # the default seed count (--k-restarts runs)
#   RUN=runs/select_k_10 SEEDS=10 bash scripts/reproduce_select_k.sh   # 10 seeds
# Reduced sizes (PER transitions per behaviour on the navigation sets, EPISODES episodes per controller):
# the full navigation set costs about 6 min per seed per K here (2M rows). Run again after an
# interruption: finished data sets are skipped and the cut one resumes (--resume reuses finished K's).
# FIXED=1 also runs stage 1 with the true K on all rows of each set (the cost of one run, and its rand index).
# Extra flags: CLUSTER_ARGS (every stage-1 run), MUJOCO_ARGS (the MuJoCo set's stage-1 run only).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/select_k}
SEEDS=${SEEDS:-}
PER=${PER:-10000}
PER_UNEQUAL=${PER_UNEQUAL:-37500}  # 100 trajectories, 10 of the minority: 2 held out
EPISODES=${EPISODES:-20}
SETS=${SETS:-"paper one three four controllers start3 segment unequal five"}
seeds=(); [ -n "$SEEDS" ] && seeds=(--num-seeds "$SEEDS")
read -r -a cluster_args <<< "${CLUSTER_ARGS:-}"
read -r -a mujoco_args <<< "${MUJOCO_ARGS:-}"
mkdir -p "$RUN/data"
export MINARI_DATASETS_PATH="$RUN/minari"
MUJOCO_IDS=empo/pendulum/controllers-b0-v0,empo/pendulum/controllers-b1-v0
stage1() {  # stage1 NAME OUT FLAGS...: stage 1 on data set NAME (its data and preset), SEEDS seeds, into OUT
  local name=$1 out=$2; shift 2
  if [ "$name" = controllers ]; then
    python empo_cluster.py --preset d4rl --dataset "$MUJOCO_IDS" --out "$out" "$@" "${seeds[@]}" \
      --resume "${cluster_args[@]}" "${mujoco_args[@]}"
  else
    python empo_cluster.py --dataset "$RUN/data/nav_$name.npz" --out "$out" "$@" "${seeds[@]}" \
      --resume "${cluster_args[@]}"
  fi
}
for name in $SETS; do
  out="$RUN/$name/cluster.npz"
  if [ -f "$out" ]; then echo "=== $name: $out exists, skipped"; continue; fi
  t0=$SECONDS
  if [ "$name" = controllers ]; then
    [ -d "$MINARI_DATASETS_PATH/empo/pendulum/controllers-b1-v0" ] || \
      python scripts/make_mujoco_set.py --episodes "$EPISODES" --overwrite
  else
    data="$RUN/data/nav_$name.npz"
    if [ "$name" = unequal ]; then
      [ -f "$data" ] || python nav_env.py --out "$data" --shares 0.9 0.1 --transitions-per-behaviour "$PER_UNEQUAL"
    else
      [ -f "$data" ] || python nav_env.py --out "$data" --subgoals "$name" --transitions-per-behaviour "$PER"
    fi
  fi
  case $name in four) kmax=5 ;; five) kmax=6 ;; *) kmax=4 ;; esac
  echo "=== $name: --k auto --k-max $kmax, ${SEEDS:-default} seeds"
  stage1 "$name" "$out" --k auto --k-max "$kmax"
  echo "=== $name took $((SECONDS - t0)) s"
  echo "$name auto $((SECONDS - t0))" >> "$RUN/times.txt"
done
# The cost of --k auto against one run: stage 1 with the true K on all rows of each set (FIXED=0 skips it).
for name in $SETS; do
  [ "${FIXED:-0}" = 1 ] || break
  out="$RUN/$name/fixed_k/cluster.npz"
  if [ -f "$out" ]; then echo "=== $name, true K: $out exists, skipped"; continue; fi
  t0=$SECONDS
  case $name in one) k=1 ;; three|start3) k=3 ;; four) k=4 ;; five) k=5 ;; *) k=2 ;; esac
  echo "=== $name: K = $k (the true K), ${SEEDS:-default} seeds, all rows"
  stage1 "$name" "$out" --k "$k"
  echo "=== $name, true K took $((SECONDS - t0)) s"
  echo "$name fixed $((SECONDS - t0))" >> "$RUN/times.txt"
done
python scripts/select_k_table.py --run "$RUN" --out "$RUN/select_k.md"
