"""Stage 1 speed: compile time, seconds per M-only epoch and per EM epoch, for several seed counts.

Measures one epoch of each kind on the data set and extrapolates the default schedule
(N_b + N_p = 23 M-only epochs, N_E = 60 EM epochs). Run as a script so that each CPU core is one
XLA device (seeds are sharded over devices):

    python bench/bench_cluster.py --dataset data/nav.npz --seeds 1 2 10
"""

import os
import sys

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import contextlib  # noqa: E402
import io  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import jax  # noqa: E402
import tyro  # noqa: E402

import empo_cluster  # noqa: E402


@dataclass
class Args:
    dataset: str = "data/nav.npz"
    """data set to cluster (default: the 2M-transition navigation set)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 10])
    """seed counts to measure"""
    m_epochs: int = 23
    """M-only epochs of the schedule to extrapolate (N_b + N_p)"""
    em_epochs: int = 60
    """EM epochs of the schedule to extrapolate (N_E)"""


def one_run(args: Args, num_seeds: int, bias: int, em: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        return empo_cluster.main(empo_cluster.Args(
            dataset=args.dataset, out=os.path.join(tmp, "c.npz"), num_seeds=num_seeds,
            bias_epochs=bias, pretrain_epochs=0, em_epochs=em, log_every=1000))


def main(args: Args) -> None:
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}, {len(jax.devices())} device(s), "
          f"{os.cpu_count()} CPU cores; data set {args.dataset}")
    print("| seeds | compile s | s / M epoch | s / EM epoch | default schedule, extrapolated | per seed |")
    print("|---|---|---|---|---|---|")
    for s in args.seeds:
        m = one_run(args, s, bias=1, em=0)
        em = one_run(args, s, bias=0, em=1)
        total = m["compile_s"] + args.m_epochs * m["train_s"] + args.em_epochs * em["train_s"]
        print(f"| {s} | {em['compile_s']:.1f} | {m['train_s']:.1f} | {em['train_s']:.1f} | "
              f"{total / 60:.1f} min | {total / 60 / s:.2f} min |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
