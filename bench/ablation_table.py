"""Print the Table 3/5 ablation as a Markdown table from the cluster.npz files of bench/ablation_cluster.sh."""

import glob
import os
import sys

import numpy as np

root = sys.argv[1] if len(sys.argv) > 1 else "runs/ablation"
cells = {}
for path in sorted(glob.glob(os.path.join(root, "*", "cluster.npz"))):
    with np.load(path, allow_pickle=False) as f:
        cells[os.path.basename(os.path.dirname(path))] = 100 * f["rand_index"]
print("| | N_p = 0, N_b = 0 | N_p = 0, N_b = 3 | N_p = 20, N_b = 0 | N_p = 20, N_b = 3 |")
print("|---|---|---|---|---|")
for mu in ["0", "0.9"]:
    row = [f"μ = {mu}"]
    for np_, nb in [(0, 0), (0, 3), (20, 0), (20, 3)]:
        ri = cells.get(f"mu{mu}_np{np_}_nb{nb}")
        row.append("–" if ri is None else f"{ri.mean():.2f} ± {ri.std():.2f} (min {ri.min():.2f}, n={len(ri)})")
    print("| " + " | ".join(row) + " |")
