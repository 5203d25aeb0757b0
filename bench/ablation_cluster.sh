#!/usr/bin/env bash
# The clustering ablation of Tables 3 and 5 on the navigation task: rand index over SEEDS seeds for
# mu in {0, 0.9} x N_p in {0, 20} x N_b in {0, 3}, every other setting at its Table 4 default.
#   DATA=data/nav.npz SEEDS=10 bash bench/ablation_cluster.sh     (full size: ~80 min per cell on 2 CPU cores)
# Cells already written are skipped and an interrupted cell resumes from its checkpoint.
# Writes $OUT/<cell>/cluster.npz and prints one line per cell; bench/ablation_table.py makes the table.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/nav.npz}
SEEDS=${SEEDS:-10}
OUT=${OUT:-runs/ablation}
for mu in 0 0.9; do
  for np_ in 0 20; do
    for nb in 0 3; do
      cell="mu${mu}_np${np_}_nb${nb}"
      if [ -f "$OUT/$cell/cluster.npz" ]; then echo "$cell done"; continue; fi  # an interrupted sweep resumes
      python empo_cluster.py --dataset "$DATA" --out "$OUT/$cell/cluster.npz" --num-seeds "$SEEDS" \
        --momentum "$mu" --pretrain-epochs "$np_" --bias-epochs "$nb" --log-every 1000 --resume | grep "rand index" | tail -1 \
        | sed "s/^/$cell /"
    done
  done
done
