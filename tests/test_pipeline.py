"""The README's main command (scripts/run_nav.sh) end to end with tiny arguments, in a temporary folder."""

import os
import pathlib
import subprocess

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_main_command_runs_every_stage_end_to_end(tmp_path):
    env = dict(os.environ, RUN=str(tmp_path / "run"), DATA=str(tmp_path / "nav.npz"), SEEDS="2",
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               DATA_ARGS="--transitions-per-behaviour 3000",
               CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 2 --em-epochs 3 --hidden-dim 32 --log-every 100",
               PPO_ARGS="--q-steps 400 --steps-per-call 200 --v-epochs 1 --pi-epochs 2 --eval-episodes 2",
               HIGHLEVEL_ARGS="--steps 400 --steps-per-call 200 --eval-episodes 3")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "run_nav.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("data", "cluster", "ppo", "highlevel"):
        assert f"=== {stage} took" in out.stdout
    run = tmp_path / "run"
    cluster, ppo, high = (np.load(run / f"{name}.npz") for name in ("cluster", "ppo", "highlevel"))
    assert str(high["schema"]) == "empo/highlevel/v1"
    assert high["eval/return"].shape == (2, 3) and ppo["eval/pi_return"].shape[:2] == (2, 2)
    assert high["seeds"].tolist() == ppo["seeds"].tolist() == cluster["seeds"].tolist() == [1, 2]
    assert "final policy" in out.stdout
    # The same command again finds every output and recomputes nothing (an interrupted run continues).
    before = {name: (run / f"{name}.npz").stat().st_mtime_ns for name in ("cluster", "ppo", "highlevel")}
    again = subprocess.run(["bash", str(ROOT / "scripts" / "run_nav.sh")], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("exists, skipped") == 4 and " took " not in again.stdout
    assert before == {name: (run / f"{name}.npz").stat().st_mtime_ns for name in ("cluster", "ppo", "highlevel")}
