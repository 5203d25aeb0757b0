"""The README's main command (scripts/run_nav.sh) and the Table 1 reproduction (scripts/reproduce_table1.sh)
end to end with tiny arguments, in a temporary folder."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--steps 400 --steps-per-call 200 --hidden-dim 32 --eval-episodes 3"
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, str(ROOT / "scripts"))
import device_check  # noqa: E402  (the device check's smoke test runs the main command with the same flags)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """scripts/run_nav.sh with tiny arguments: (environment, run folder, completed process)."""
    root = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, RUN=str(root / "run"), DATA=str(root / "nav.npz"), JAX_PLATFORMS="cpu",
               XLA_FLAGS=TWO_DEVICES, **device_check.PIPELINE["tiny"])  # 2 seeds, 3,000 rows per behaviour
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
    for step in ("EMPO K=1 stage 1", "EMPO K=1 stage 2", "BC", "TD3+BC raw units", "TD3+BC raw units gamma 0.99",
                 "TD3+BC a/a_max units", "TD3+BC a/a_max units gamma 0.99"):
        assert f"=== {step} took" in out.stdout
    assert int(np.load(table_run / "k1" / "cluster.npz")["arch/k"]) == 1
    assert np.load(table_run / "k1" / "ppo.npz")["eval/pi_positions"].shape == (2, 1, 3, 1001, 2)
    text = (table_run / "table1.md").read_text()
    table = text.split("\n\n")[0].splitlines()  # the first block: returns and route classes
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table[2:] if line.startswith("|")}
    names = ["BC", "TD3+BC (raw units, γ 0.999)", "TD3+BC (raw units, γ 0.99)", "TD3+BC (a/a_max units, γ 0.999)",
             "TD3+BC (a/a_max units, γ 0.99)", "EMPO K=1", "EMPO K=2"]
    assert list(rows)[:14] == [(name, protocol) for protocol in ("sampled", "mean") for name in names]
    assert all("| 2 × 3 |" in rows[key] for key in list(rows)[:14])
    assert ("data set, behaviour 0", "–") in rows and ("data set, behaviour 1", "–") in rows
    for protocol, infix in (("sampled", "sampled_"), ("mean", "")):
        returns = np.load(run / "highlevel.npz")[f"eval/{infix}return"]
        assert f"{returns.mean():.1f} ± {returns.std():.1f}" in rows[("EMPO K=2", protocol)]
        routes = np.load(run / "highlevel.npz")[f"eval/{infix}route"]
        counts = " | ".join(str(int((routes == i).sum())) for i in range(4))
        assert f"| {counts} |" in rows[("EMPO K=2", protocol)]
    corridors = [line for line in text.split("Conflict corridors")[1].splitlines() if line.startswith("| ")]
    assert len(corridors) == 1 + 14 and corridors[-1].startswith("| EMPO K=2 | mean | ")
    assert all(line.count("/6 |") == 2 for line in corridors[1:])  # 2 seeds x 3 rollouts, per corridor
    assert (table_run / "table1.png").stat().st_size > 10_000


def test_figure4_reproduction_sweeps_both_arms_from_one_run_each(pipeline, tmp_path):
    env, run, _ = pipeline
    env = dict(env, RUN=str(tmp_path / "figure4"), CLUSTER=str(run / "cluster.npz"), SEEDS="2", EVAL_AT="0,1,3",
               OUT=str(tmp_path / "figure4" / "figure4"),
               PPO_ARGS="--q-steps 400 --steps-per-call 200 --v-epochs 1 --batch-size 64")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_figure4.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    full, mini = (np.load(tmp_path / "figure4" / arm / "ppo.npz") for arm in ("full", "mb256"))
    for arm in (full, mini):
        assert arm["eval/sweep_epochs"].tolist() == [0, 1, 3]
        assert arm["eval/sweep_return"].shape == arm["eval/sweep_sampled_route"].shape == (2, 2, 3, 10)
        # the last epoch of the sweep is the run's own final evaluation of pi_L
        np.testing.assert_array_equal(arm["eval/sweep_return"][:, :, -1], arm["eval/pi_return"])
        np.testing.assert_array_equal(arm["eval/sweep_sampled_return"][:, :, 0], arm["eval/beta_sampled_return"])
    for key in (k for k in full.files if k.startswith(("q/", "v/"))):
        np.testing.assert_array_equal(full[key], mini[key])  # the same Q and V in both arms
    assert any(not np.array_equal(full[k], mini[k]) for k in full.files if k.startswith("pi/params/"))
    table = (tmp_path / "figure4" / "figure4.md").read_text()
    assert "Q and V identical in both arms: yes" in table and "| minibatch 256 | sampled |" in table
    assert (tmp_path / "figure4" / "figure4.png").stat().st_size > 10_000


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(command: list, env: dict, count: int = 2, timeout: float = 300) -> list:
    """``command`` as one run over ``count`` processes (JAX's multi-process runtime, a localhost coordinator, one
    CPU device each): the completed processes' (status, output)."""
    port = free_port()
    procs = [subprocess.Popen(command, env=dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(i),
                                                XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for i in range(count)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        return [(p.returncode, text) for p, text in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def same_arrays(a: pathlib.Path, b: pathlib.Path) -> list:
    """The arrays that differ between two outputs, metadata (flags, inputs' digests, producer) aside."""
    x, y = np.load(a), np.load(b)
    meta = {"args", "inputs", "producer"}
    assert set(x.files) == set(y.files)
    return [k for k in x.files if k not in meta and not np.array_equal(x[k], y[k])]


def test_seeds_across_two_processes_equal_one_process_with_two_devices(pipeline, tmp_path):
    """Each stage run as two processes (JAX's multi-process runtime, one CPU device each, a localhost coordinator)
    writes the same outputs as the main command's one process with two devices, for the same seeds: the seeds are
    sharded over both processes' devices, the inputs read in each, the outputs gathered and written by process 0."""
    env, run, _ = pipeline
    data, flags = env["DATA"], device_check.PIPELINE["tiny"]
    seeds = ["--seed", "1", "--num-seeds", "2"]
    stages = [
        ("cluster", ["empo_cluster.py", "--dataset", data], "CLUSTER_ARGS"),
        ("ppo", ["empo_ppo.py", "--dataset", data, "--cluster", str(tmp_path / "cluster.npz")], "PPO_ARGS"),
        ("highlevel", ["empo_highlevel.py", "--dataset", data, "--cluster", str(tmp_path / "cluster.npz"),
                       "--ppo", str(tmp_path / "ppo.npz")], "HIGHLEVEL_ARGS"),
    ]
    for name, command, var in stages:
        out = tmp_path / f"{name}.npz"
        done = run_processes([sys.executable, *command, "--out", str(out), *seeds, *flags[var].split()], env)
        assert all(status == 0 for status, _ in done), "\n".join(text[-2000:] for _, text in done)
        assert same_arrays(out, run / f"{name}.npz") == [], name
        assert len(list((tmp_path / name).glob("events.out.tfevents.*"))) == 1  # process 0's TensorBoard log
    assert not list(tmp_path.glob("*.checkpoint.npz")) and not list(tmp_path.glob(".*.tmp"))
    # Seeds that the processes cannot share evenly: one sentence from each, nothing written.
    odd = tmp_path / "odd.npz"
    done = run_processes([sys.executable, "empo_cluster.py", "--dataset", data, "--out", str(odd), "--num-seeds", "3",
                          *flags["CLUSTER_ARGS"].split()], env)
    for status, text in done:
        assert status == 1 and "error: --num-seeds 3 cannot be shared evenly by the run's 2 processes" in text, text
    assert not odd.exists()
