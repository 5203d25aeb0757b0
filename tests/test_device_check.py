"""scripts/device_check.sh, the GPU check, run here with tiny sizes: every step it takes on the GPU machine runs
(the navigation pipeline and Table 1's row of its run, the unit benchmarks with FLOPs from a file and 1 and 2
vmapped seeds, the seeds scaling) and the report holds their results, so that a device's limited minutes are not
spent on a broken script. Then what the GPU machine alone runs: its FLOPs files, its pipeline flags, and the report
of a pipeline stopped by its share of the budget."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]
import device_check  # noqa: E402


def test_device_check_runs_every_step_with_tiny_sizes(tmp_path):
    out = tmp_path / "report"
    # two host devices, as in tests/test_pipeline.py, whose main command reuses these compiled programs
    env = dict(os.environ, TINY="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), str(out)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "device_check.md").read_text()
    lines = report.splitlines()

    # The pipeline, stage by stage, then Table 1's EMPO row of its run: 2 seeds x 3 rollouts, every rollout in one
    # route class.
    assert "## Navigation pipeline, 2 seeds, tiny sizes, reduced schedules: ok" in report
    for stage in ("data", "cluster", "ppo", "highlevel"):
        assert re.search(rf"^\| {stage} \| \d+ s \| done \|", report, re.M), stage
    assert "rand index" in report
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| EMPO K=2 |")]
    assert [[c.strip() for c in row[1:3]] for row in rows] == [["sampled", "2 × 3"], ["mean", "2 × 3"]]
    for row in rows:  # fast, detour, through S_p, no goal
        assert sum(int(c) for c in row[5:9]) == 6

    # The units, the stage alone, with FLOPs from the file counted first: scaled by the seeds, no probe compiled.
    assert "FLOP probes compiled on this machine: nav, 1 seed(s) 0, nav, 2 seed(s) 0, nav, 4 seed(s) 0." in report
    bench = {}
    for seeds in (1, 2, 4):
        bench[seeds] = json.loads((out / f"bench_stages_nav_seeds{seeds}.json").read_text())
        assert bench[seeds]["probes_compiled"] == 0 and bench[seeds]["complete"], seeds
        assert bench[seeds]["flops_source"].startswith("--flops-from ")
        assert sorted(r["unit"] for r in bench[seeds]["results"]) == ["iql", "sarsa"]
        assert all(r["floor_s"] is None and r["stage_s"] > 0 for r in bench[seeds]["results"])
    for one, four in zip(bench[1]["results"], bench[4]["results"]):
        assert four["stage_flops"] == pytest.approx(4 * one["stage_flops"], rel=1e-12)
    for seeds in (1, 2):
        assert f"## Units, nav, {seeds} seed(s), 4,096 rows, the stage alone: ok" in report
        assert any(line.startswith("| nav | iql | 20 |") for line in lines[lines.index(
            next(line for line in lines if line.startswith(f"## Units, nav, {seeds} seed(s)"))):]), seeds

    # The seeds scaling: seconds per call with 1, 2 and 4 seeds, per seed, and where the time per call grows.
    assert "## Seeds scaling, nav: seconds per call of the stage with 1 to 4 vmapped seeds" in report
    scaling = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
               for line in lines if line.startswith(("| sarsa |", "| iql |"))}
    assert sorted(scaling) == ["iql", "sarsa"]
    for unit, cells in scaling.items():
        per_call = {s: next(r["stage_s"] for r in bench[s]["results"] if r["unit"] == unit) for s in (1, 2, 4)}
        assert [float(c) for c in cells[2:5]] == pytest.approx([per_call[s] for s in (1, 2, 4)], rel=1e-3)
        assert [float(c) for c in cells[5:8]] == pytest.approx([per_call[s] / s for s in (1, 2, 4)], rel=1e-2)
        assert re.fullmatch(r"not by 4 seeds|between [124] and [24] seeds \(about \d+ by linear interpolation\)",
                            cells[8]), cells[8]

    summary = json.loads((out / "device_check.json").read_text())
    assert [p["status"] for p in summary["parts"]] == ["ok"] * 6
    assert summary["pipeline"]["highlevel"]["how_far"] == "done" and summary["table1"][2].startswith("| EMPO K=2 |")
    assert sorted(p.name for p in out.iterdir()) == sorted(  # the device tool returns at most 8 files
        ["device_check.md", "device_check.json", "device_check.log", "bench_stages_nav_seeds1.json",
         "bench_stages_nav_seeds2.json", "bench_stages_nav_seeds4.json"])


def test_device_check_names_a_missing_report_folder():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], capture_output=True, text=True)
    assert run.returncode != 0 and "usage: bash scripts/device_check.sh REPORT_DIR" in run.stderr


def test_the_gpu_pipeline_flags_are_flags_of_their_stages():
    """The schedules that only the GPU machine runs are checked here: every flag parses (the full check's are
    run_nav.sh's defaults, so none)."""
    import tyro

    import empo_cluster
    import empo_highlevel
    import empo_ppo
    import nav_env

    assert not any(device_check.PIPELINE["full"][var] for var in ("DATA_ARGS", "CLUSTER_ARGS", "PPO_ARGS",
                                                                   "HIGHLEVEL_ARGS"))
    for stage, var in ((nav_env, "DATA_ARGS"), (empo_cluster, "CLUSTER_ARGS"), (empo_ppo, "PPO_ARGS"),
                       (empo_highlevel, "HIGHLEVEL_ARGS")):
        for flags in device_check.PIPELINE.values():
            tyro.cli(stage.Args, args=flags[var].split())  # exits (SystemExit) on an unknown or malformed flag


def test_the_committed_flops_files_serve_every_part_of_the_gpu_check():
    """docs/bench/flops_{nav,d4rl}.json hold every unit at the GPU check's rows and steps per call, and serve each of
    its seed counts by multiplying the 1-seed count: no part of the GPU check would compile a probe or stop."""
    import bench_stages

    full = device_check.UNITS["full"]
    parts = [(size, seeds, bench_stages.UNITS) for size, seeds, _ in full["parts"]] + [full["scaling"]]
    flops = lambda size, units, seeds: bench_stages.read_flops(device_check.FLOPS[size], [size], units, full["rows"],
                                                               full["steps_per_call"], seeds, floor=False)
    for size, seeds, units in parts:
        known, one = flops(size, units, seeds), flops(size, units, 1)
        assert sorted(unit for _, unit in known) == sorted(units)
        for key, (stage, _) in known.items():
            assert stage == pytest.approx(seeds * one[key][0], rel=1e-12) and stage > 0


def test_a_pipeline_stopped_by_its_share_says_how_far_each_stage_got():
    text = "\n".join([
        "=== data: python nav_env.py", "=== data took 8 s", "=== cluster: python empo_cluster.py",
        "[cluster] 83/83 (100%) elapsed 70s, left ~0s phase=em", "=== cluster took 95 s", "=== ppo: python empo_ppo.py",
        "[ppo] 1/60 (2%) elapsed 9s, left ~518s part=q", "[ppo] 12/60 (20%) elapsed 30s, left ~120s part=q"])
    lines, stages = device_check.pipeline_report("full", "stopped at the end of its share", 150.0, text, 150.0,
                                                 {"stage 1": 60.0, "stage 2": 20.0, "stage 3": 100.0})
    report = "\n".join(lines)
    assert "## Navigation pipeline, 10 seeds, the paper's full schedules (run_nav.sh defaults): stopped" in report
    assert stages["cluster"]["how_far"] == "done" and stages["data"]["wall"] == "8 s"
    assert stages["ppo"]["how_far"] == "12/60 units (20%) after 30 s of training" and stages["ppo"]["left_s"] == 120
    assert stages["highlevel"]["how_far"] == "not started" and stages["highlevel"]["units_training_s"] == 100
    assert "Time left by extrapolation: ~220 s (ppo: ~120 s by its own progress line; highlevel: ~100 s of " \
           "training by the units;" in report


def test_the_seed_count_where_the_time_per_call_grows():
    lines, rows = device_check.scaling_table({1: {"iql": 1.0, "sarsa": 1.0}, 10: {"iql": 1.1, "sarsa": 1.3},
                                              100: {"iql": 3.3, "sarsa": 9.0}}, {"iql": 1000, "sarsa": 1000},
                                             ("m_epoch", "sarsa", "iql"))
    grows = {row["unit"]: row["grows"] for row in rows}
    assert grows["iql"] == "between 10 and 100 seeds (about 14 by linear interpolation)"  # 10 + 0.1 / 2.2 * 90
    assert grows["sarsa"] == "between 1 and 10 seeds (about 7 by linear interpolation)"  # 1 + 0.2 / 0.3 * 9
    assert grows["m_epoch"] == "1-seed time not measured"
    assert "| iql | 1,000 | 1 | 1.1 | 3.3 | 1 | 0.11 | 0.033 | between 10 and 100" in "\n".join(lines)
