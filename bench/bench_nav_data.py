"""Benchmark: the JAX Algorithm 3 generator of nav_env against a plain Python/NumPy loop.

Times ``nav_env.generate_dataset`` on the paper's data set size (1,000,000 transitions per behaviour,
2,000,000 in all): the first call (compile + run) and a second, warm call with the same arguments,
separately. The plain loop is Algorithm 3 with the Eq. (15) policy written as the paper's nested
loops, one environment step at a time in NumPy float32 (the same loop as tests/test_nav_env.py); it
is timed on fewer transitions (``--python-transitions-per-behaviour``) and its time is extrapolated
linearly to the JAX transition count, which the output says. Per-behaviour statistics
(``nav_env.behaviour_stats``) of both data sets are printed for comparison.

Example
    python bench/bench_nav_data.py
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nav_env  # noqa: E402


@dataclass
class Args:
    """Time the JAX data set generator (Algorithm 3) against a plain Python/NumPy loop."""

    # --- experiment ---
    seed: int = 0
    """random seed of both generators"""
    # --- sizes ---
    transitions_per_behaviour: int = 1_000_000
    """transitions per behaviour for the JAX generator (the paper's 1,000,000; two behaviours)"""
    python_transitions_per_behaviour: int = 200_000
    """transitions per behaviour actually run by the Python loop; its time is extrapolated linearly"""


F = np.float32


def numpy_step(s, a, t, max_steps=1000):
    """Appendix A: (s', r, terminated, truncated); ``t`` = steps taken before this one."""
    a = np.clip(np.asarray(a, F), F(-0.2), F(0.2))
    s = np.clip(s + a, F(0.0), F(30.0))
    terminated = bool(np.linalg.norm(s.astype(np.float64) - 30.0) < 0.1)
    in_sp = bool(15 <= s[0] <= 30 and 0 <= s[1] <= 10)
    reward = 0.0 if terminated else (-2.0 if in_sp else -1.0)
    return s, reward, terminated, (t + 1 >= max_steps) and not terminated


def numpy_episode(rng, subgoals, max_steps=1000):
    """One episode of Algorithm 3 (Eq. 15 policy); returns (length, return, penalty steps, timed out)."""
    s = rng.uniform(0.0, 0.1, 2).astype(F)
    t, ret, penalty, done, timed_out = 0, 0.0, 0, False, False
    for g_s in [np.asarray(g, F) for g in list(subgoals) + [(30.0, 30.0)]]:
        while not done and np.linalg.norm(s - g_s) >= 0.1:
            eps = rng.standard_normal(2).astype(F)
            a = np.clip(np.clip(g_s - s, -0.2, 0.2) + F(0.1) * eps, -0.2, 0.2)  # Eq. (15)
            s, r, terminated, truncated = numpy_step(s, a, t, max_steps)
            t, ret, penalty = t + 1, ret + r, penalty + int(r == -2.0)
            done, timed_out = terminated or truncated, truncated
    return t, ret, penalty, timed_out


def numpy_behaviour(rng, subgoals, transitions: int) -> np.ndarray:
    """Whole episodes until ``transitions`` rows; [E, 4] of (length, return, penalty steps, timed out)."""
    episodes, count = [], 0
    while count < transitions:
        episodes.append(numpy_episode(rng, subgoals))
        count += episodes[-1][0]
    return np.asarray(episodes, np.float64)


def main(args: Args) -> None:
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
          f"{os.cpu_count()} CPU cores")
    quiet = lambda _: None  # noqa: E731

    start = time.perf_counter()
    data = nav_env.generate_dataset(args.seed, args.transitions_per_behaviour, log=quiet)
    first = time.perf_counter() - start
    start = time.perf_counter()
    data = nav_env.generate_dataset(args.seed, args.transitions_per_behaviour, log=quiet)
    warm = time.perf_counter() - start
    n_jax = len(data["rewards"])

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    python = [numpy_behaviour(rng, subgoals, args.python_transitions_per_behaviour) for subgoals in nav_env.SUBGOALS]
    python_s = time.perf_counter() - start
    n_python = int(sum(p[:, 0].sum() for p in python))
    python_rate = n_python / python_s

    rows = [
        ("JAX generate_dataset, first call (compile + run)", n_jax, first),
        ("JAX generate_dataset, second call (warm)", n_jax, warm),
        ("Python/NumPy loop, measured", n_python, python_s),
        (f"Python/NumPy loop, extrapolated to {n_jax:,}", n_jax, n_jax / python_rate),
    ]
    print(f"\n{'method':<52}{'transitions':>13}{'seconds':>10}{'transitions/s':>15}{'speed-up':>10}")
    for name, n, seconds in rows:
        rate = n / seconds
        print(f"{name:<52}{n:>13,}{seconds:>10.2f}{rate:>15,.0f}{rate / python_rate:>9.1f}x")
    print(f"(speed-up = transitions/s over the Python loop's; the last row is the measured rate of "
          f"{n_python:,} transitions scaled linearly, not a run)")

    print(f"\n{'per behaviour':<28}{'episodes':>9}{'mean length':>13}{'mean return':>13}"
          f"{'mean penalty steps':>20}{'timeouts':>10}")
    for label in range(len(nav_env.SUBGOALS)):
        rows = data["behaviour"] == label
        stats = nav_env.behaviour_stats({k: v[rows] for k, v in data.items()})
        print(f"{'JAX, behaviour ' + str(label):<28}{stats['episodes']:>9,}{stats['mean_length']:>13.1f}"
              f"{stats['mean_return']:>13.1f}{stats['mean_penalty_steps']:>20.1f}{stats['timeouts']:>10}")
    for label, episodes in enumerate(python):
        print(f"{'Python loop, behaviour ' + str(label):<28}{len(episodes):>9,}{episodes[:, 0].mean():>13.1f}"
              f"{episodes[:, 1].mean():>13.1f}{episodes[:, 2].mean():>20.1f}{int(episodes[:, 3].sum()):>10}")


if __name__ == "__main__":
    main(tyro.cli(Args))
