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
