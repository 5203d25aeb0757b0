"""scripts/device_check.sh, the GPU check, run here with tiny sizes: every step it takes on the GPU machine runs
(the unit benchmark with vmapped seeds, the navigation pipeline) and the report holds their results,
so that a device's limited minutes are not spent on a broken script."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_device_check_runs_every_step_with_tiny_sizes(tmp_path):
    out = tmp_path / "report"
    # two host devices, as in tests/test_pipeline.py, whose main command reuses these compiled programs
    env = dict(os.environ, TINY="1", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (out / "device_check.md").read_text()
    assert "## Units against their floors, nav, 2 seed(s), 4096 rows: ok" in report
    assert any(line.startswith("| nav | iql |") for line in report.splitlines()), "no row for the unit"
    assert "## Navigation pipeline, 2 seeds, reduced schedules: ok" in report
    for stage in ("data", "cluster", "ppo", "highlevel"):
        assert f"| {stage} | " in report
    assert "rand index" in report
    assert sorted(p.name for p in out.iterdir()) == sorted(  # the device tool returns at most 8 files
        ["device_check.md", "device_check.json", "bench_stages_nav_seeds2.json"])


def test_device_check_names_a_missing_report_folder():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], capture_output=True, text=True)
    assert run.returncode != 0 and "usage: bash scripts/device_check.sh REPORT_DIR" in run.stderr


def test_the_gpu_pipeline_flags_are_flags_of_their_stages():
    """The reduced schedules that only the GPU machine runs are checked here: every flag parses."""
    import sys

    import tyro

    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import device_check

    import empo_cluster
    import empo_highlevel
    import empo_ppo
    import nav_env

    for stage, var in ((nav_env, "DATA_ARGS"), (empo_cluster, "CLUSTER_ARGS"), (empo_ppo, "PPO_ARGS"),
                       (empo_highlevel, "HIGHLEVEL_ARGS")):
        for flags in device_check.PIPELINE.values():
            tyro.cli(stage.Args, args=flags[var].split())  # exits (SystemExit) on an unknown or malformed flag
