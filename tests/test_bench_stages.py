"""bench/bench_stages.py: the seeds sharded over host devices as the stages shard theirs, and its bad arguments."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "bench" / "bench_stages.py")


def run(*flags):
    # XLA_FLAGS left to the script: with --devices above 1 it exposes one host device per core, as the stages do
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, BENCH, *flags], capture_output=True, text=True, timeout=300,
                          env=dict(env, JAX_PLATFORMS="cpu"))


def test_seeds_sharded_over_two_host_devices(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("--size", "nav", "--rows", "4096", "--seeds", "2", "--devices", "2", "--units", "sarsa",
               "--repeats", "1", "--warmup", "0", "--steps-per-call", "10", "--json", str(out))
    if os.cpu_count() < 2:  # one core: one host device, and the script says so in one sentence
        assert proc.returncode != 0 and "asks for more devices than JAX sees" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["machine"]["devices"]) >= 2
    (result,) = report["results"]
    assert result["unit"] == "sarsa" and result["devices"] == 2 and result["seeds"] == 2
    assert result["stage_s"] > 0 and result["floor_s"] > 0 and result["stage_flops"] > 0
    assert "2 seed(s) on 2 device(s)" in proc.stdout


def test_devices_that_do_not_divide_the_seeds_are_refused_in_one_sentence():
    proc = run("--seeds", "3", "--devices", "2", "--units", "sarsa")
    assert proc.returncode == 2 and "--devices 2 must be at least 1 and divide --seeds 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chunked_probes_count_the_flops_of_an_all_rows_probe(monkeypatch):
    """The FLOP probes of the E-step and the PPO epoch run the first chunk of rows and multiply by the number of
    chunks. On data of 4 chunks that gives the FLOPs of a probe over all rows as one chunk (the earlier probe, which
    needed 83 GB at the D4RL size with 10 seeds on a GPU), for the stage and for the floor."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_stages

    import empo_cluster
    import empo_ppo

    cfg = bench_stages.Config(size="nav", **bench_stages.SIZES["nav"], rows=4096, seeds=1, steps_per_call=10)

    def flops(chunk: int) -> dict:
        monkeypatch.setitem(empo_cluster.PRESETS, "nav",
                            dataclasses.replace(empo_cluster.PRESETS["nav"], estep_chunk=chunk))
        monkeypatch.setitem(empo_ppo.PRESETS, "nav", dataclasses.replace(empo_ppo.PRESETS["nav"], chunk=chunk))
        units = {**bench_stages.stage1_units(cfg, ["em_epoch"]), **bench_stages.stage2_units(cfg, ["ppo_epoch"])}
        return {(name, who): getattr(unit, f"{who}_flops")() for name, unit in units.items()
                for who in ("stage", "floor")}

    chunked, whole = flops(1024), flops(4096)
    for key, count in chunked.items():
        assert abs(count / whole[key] - 1.0) < 0.01, (key, count, whole[key])


def test_a_flops_file_that_cannot_serve_is_refused_in_one_sentence(tmp_path):
    """--flops-from: a missing file, a file without the unit at these rows, and --flops-only without --json."""
    other = tmp_path / "flops.json"
    other.write_text(json.dumps({"results": [{"size": "nav", "unit": "sarsa", "rows": 8192, "seeds": 1,
                                              "steps_per_call": 10, "stage_flops": 1e9, "floor_flops": 1e9}]}))
    cases = [(["--flops-from", str(tmp_path / "missing.json")], f"--flops-from {tmp_path / 'missing.json'} does "
                                                                 "not exist"),
             (["--flops-from", str(other), "--rows", "4096"], f"--flops-from {other} has no FLOPs of sarsa at the nav "
                                                              "size with 4,096 rows and 10 steps per call"),
             (["--flops-only"], "--flops-only writes the FLOPs it counts to --json FILE")]
    for flags, sentence in cases:
        proc = run("--size", "nav", "--units", "sarsa", "--steps-per-call", "10", *flags)
        assert proc.returncode == 2 and sentence in proc.stderr, (flags, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr
