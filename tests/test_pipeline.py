"""The README's main command (scripts/run_nav.sh) and the Table 1 reproduction (scripts/reproduce_table1.sh)
end to end with tiny arguments, in a temporary folder."""

import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--steps 400 --steps-per-call 200 --hidden-dim 32 --eval-episodes 3"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """scripts/run_nav.sh with tiny arguments: (environment, run folder, completed process)."""
    root = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, RUN=str(root / "run"), DATA=str(root / "nav.npz"), SEEDS="2",
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               DATA_ARGS="--transitions-per-behaviour 3000",
               CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 2 --em-epochs 3 --hidden-dim 32 --log-every 100",
               PPO_ARGS="--q-steps 400 --steps-per-call 200 --v-epochs 1 --pi-epochs 2 --eval-episodes 3",
               HIGHLEVEL_ARGS="--steps 400 --steps-per-call 200 --eval-episodes 3")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "run_nav.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return env, root / "run", out


def test_main_command_runs_every_stage_end_to_end(pipeline):
    env, run, out = pipeline
    for stage in ("data", "cluster", "ppo", "highlevel"):
        assert f"=== {stage} took" in out.stdout
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


def test_table1_reproduction_runs_every_row_end_to_end(pipeline, tmp_path):
    env, run, _ = pipeline
    table_run = tmp_path / "table1"
    table_run.mkdir()
    (table_run / "k2").symlink_to(run)  # the K = 2 row is the main pipeline's run, found and not redone
    env = dict(env, RUN=str(table_run), BC_ARGS=TINY, TD3_BC_ARGS=TINY)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table1.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("exists, skipped") == 4  # data and the three stages of K = 2
    for step in ("EMPO K=1 stage 1", "EMPO K=1 stage 2", "BC", "TD3+BC"):
        assert f"=== {step} took" in out.stdout
    assert int(np.load(table_run / "k1" / "cluster.npz")["arch/k"]) == 1
    assert np.load(table_run / "k1" / "ppo.npz")["eval/pi_positions"].shape == (2, 1, 3, 1001, 2)
    table = (table_run / "table1.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert list(rows)[:4] == ["BC", "TD3+BC", "EMPO K=1", "EMPO K=2"]
    assert all("| 2 × 3 |" in rows[name] for name in list(rows)[:4])
    assert "data set, behaviour 0" in rows and "data set, behaviour 1" in rows
    returns = np.load(run / "highlevel.npz")["eval/return"]
    assert f"{returns.mean():.1f} ± {returns.std():.1f}" in rows["EMPO K=2"]
    assert (table_run / "table1.png").stat().st_size > 10_000
