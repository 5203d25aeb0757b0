"""The Python part of scripts/device_check.sh: measure the project on the machine at hand and write a report.

The whole check in one call of under 10 minutes (--budget 550 s for its parts; device_check.sh adds the wheels):
1. The README's main command with SEEDS=10 at the paper's full schedules (scripts/run_nav.sh with its defaults:
   Table 4's didactic column): the wall time of each stage, then Table 1's EMPO K=2 row of the run (scripts/table1.py,
   the same code as docs/table1.md). If its share runs out, how far each stage got and the time left by extrapolation.
2. Every stage's 8 training units (bench/bench_stages.py, the stage alone: --no-floor) at the navigation size
   (hidden 64) and the D4RL size (hidden 256), 2M rows, with 1 and with 10 vmapped seeds. Their FLOPs per call come
   from docs/bench/flops_{nav,d4rl}.json (counted on a CPU by bench_stages.py --flops-only, multiplied by the seeds),
   so no FLOP probe is compiled here.
3. Seeds scaling: m_epoch, sarsa and iql at the navigation size with 100 vmapped seeds; with the 1- and 10-seed times
   of 2., a table of seconds per call and per call per seed, and the seed count at which the time per call passes
   1.2x the 1-seed time.
Each part runs in its own process group with its own share of the budget (SHARES, in the order they run; a part's
share is its part of what is left, so time a part leaves unused goes to the parts after it); a part past its share
is stopped and the report keeps what it printed (each unit prints its line as it finishes). The pipeline runs first:
its share is what the H100 figures of docs/speed.md say it needs (about 300 s) with a margin. --tiny runs the same
steps with tiny sizes (a CPU smoke test, tests/test_device_check.py); it counts its FLOPs file first.

    python scripts/device_check.py --out runs/device_check            # what device_check.sh runs
    python scripts/device_check.py --out /tmp/check --tiny
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_stages.py")
STAGES = {"data": None, "cluster": "stage 1", "ppo": "stage 2", "highlevel": "stage 3"}  # bench_stages' names
LOG_LIMIT = 15 * 2 ** 20  # the device tool returns files under 16 MiB

# The navigation pipeline: SEEDS=10 at run_nav.sh's defaults (the full schedules: 3 + 20 + 60 stage-1 epochs, 200,000
# SARSA steps, 10 V and 10 PPO epochs, 1,000,000 IQL steps); tiny: a small data set, small networks, short schedules.
PIPELINE = {
    "full": dict(SEEDS="10", DATA_ARGS="", CLUSTER_ARGS="", PPO_ARGS="", HIGHLEVEL_ARGS=""),
    # tiny: the CPU smoke test's; tests/test_pipeline.py runs the main command with these too, so that the test
    # session's compilation cache serves both
    "tiny": dict(SEEDS="2", DATA_ARGS="--transitions-per-behaviour 3000",
                 CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 2 --em-epochs 3 --hidden-dim 32 --log-every 100",
                 PPO_ARGS="--q-steps 400 --steps-per-call 200 --v-epochs 1 --pi-epochs 2 --eval-episodes 3",
                 HIGHLEVEL_ARGS="--steps 400 --steps-per-call 200 --eval-episodes 3"),
}
# The unit benchmarks: (size, seeds, share) of each part, the scaling part's, and bench_stages' flags. Tiny: the
# vmapped path with 1, 2 and 4 seeds and two units (nav and d4rl differ by their sizes only; stage 1's units are
# left out there, as building them is the slowest part of a tiny benchmark on a CPU).
UNITS = {
    "full": dict(parts=(("nav", 1, "units nav 1"), ("nav", 10, "units nav 10"), ("d4rl", 1, "units d4rl 1"),
                        ("d4rl", 10, "units d4rl 10")), rows=2_000_000, steps_per_call=1000, units=None,
                 scaling=("nav", 100, ("m_epoch", "sarsa", "iql")), flags=["--repeats", "2", "--warmup", "0"]),
    "tiny": dict(parts=(("nav", 1, "units nav 1"), ("nav", 2, "units nav 10")), rows=4096, steps_per_call=20,
                 units=("sarsa", "iql"), scaling=("nav", 4, ("sarsa", "iql")),
                 flags=["--repeats", "1", "--warmup", "0"]),
}
FLOPS = {size: os.path.join(ROOT, "docs", "bench", f"flops_{size}.json") for size in ("nav", "d4rl")}
# Seconds of the default budget per part, in the order they run (a part's share is its part of what is left, so
# what one leaves goes to the later ones). The pipeline first, with the most: about 300 s by the H100's figures
# (docs/speed.md): stage 1 60 s, stage 2 20 s and stage 3 about 105 s of training (the 10-seed IQL chunk assumed
# 1.27x the 1-seed one, as SARSA's), and about 30 s per stage of start-up, compilation and evaluation (its
# reduced-schedule run) and more for stage 2's 100 evaluation episodes. A unit part (the stage alone, 8 units):
# about 10 s of start-up and 3-7 s of compilation per unit.
SHARES = {"pipeline": 340, "table1": 10, "units nav 1": 40, "units nav 10": 40, "units d4rl 1": 45,
          "units d4rl 10": 50, "scaling": 25}
MIN_SHARE = 5.0  # a part with less time than this is not started
SCALING_FACTOR = 1.2  # the time per call "starts to grow" at the first seed count above this times the 1-seed time


class Check:
    """The parts' budget (each part's share of what is left) and their log."""

    def __init__(self, budget: float, log_path: str):
        self.budget, self.start, self.log = budget, time.perf_counter(), open(log_path, "w")
        self.parts, self.logged = [], 0

    def share(self, name: str) -> float:
        left = self.budget - (time.perf_counter() - self.start)
        names = list(SHARES)
        return max(0.0, left) * SHARES[name] / sum(SHARES[n] for n in names[names.index(name):])

    def write(self, text: str) -> None:
        if self.logged < LOG_LIMIT:
            self.log.write(text if self.logged + len(text) < LOG_LIMIT else "[log cut at 15 MiB]\n")
            self.logged += len(text)

    def run(self, name: str, cmd: list, timeout: float, env=None) -> tuple[str, float, str]:
        """(status, seconds, output) of one part, its output echoed and logged as it comes: 'ok', 'failed (exit N)'
        or 'stopped at the end of its share'. A part runs in its own process group, so that stopping it stops its
        children too (run_nav.sh's stages), and the next part finds the device free."""
        if timeout < MIN_SHARE:
            status = f"not run: {timeout:.0f} s left of the budget"
            self.parts.append({"name": name, "status": status, "seconds": 0.0, "share_s": round(timeout)})
            print(f"=== {name}: {status}", flush=True)
            return status, 0.0, ""
        line = f"=== {name}: {shlex.join(cmd)} (at most {timeout:.0f} s)"
        print(line, flush=True)
        self.write(line + "\n")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        lines = []

        def read():
            for out in proc.stdout:
                lines.append(out.rstrip("\n"))
                self.write(out)
                print(out.rstrip("\n")[:300], flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            stop(proc)
            proc.wait()
            status = "stopped at the end of its share"
        reader.join(timeout=10)
        seconds = time.perf_counter() - t0
        self.parts.append({"name": name, "status": status, "seconds": round(seconds, 1), "share_s": round(timeout)})
        line = f"=== {name}: {status} in {seconds:.0f} s"
        print(line, flush=True)
        self.write(line + "\n")
        return status, seconds, "\n".join(lines)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a part's process group (the stages end on it in one sentence), then SIGKILL to what is left of it
    after 15 s; returns once no process of the group is left."""
    for signum, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        t0 = time.perf_counter()
        try:
            os.killpg(proc.pid, signum)
            while time.perf_counter() - t0 < wait:
                proc.poll()  # reaps the group's leader: a zombie would still count as a member
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            return


def tables(text: str, status: str) -> str:
    """A benchmark's own lines: one per unit as it finishes (kept when the part is stopped before its tables), the
    tables and the extrapolated schedules; the libraries' messages stay in device_check.log, but for the end of the
    output of a part that did not end well."""
    own = ("[", "|", "peak", "JAX ", "Extrapolated", "Not measured", "wrote ")
    keep = [line for line in text.splitlines() if line.startswith(own)]
    if status != "ok":
        keep += ["", "The end of its output:", "", *[f"    {line[:300]}" for line in text.splitlines()[-15:]]]
    return "\n".join(keep) if keep else "(no output)"


def machine() -> str:
    """The devices, read once every part has ended (this process holds no device while they run)."""
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        where = f"{len(devices)} x {', '.join(kinds)} ({jax.default_backend()}); JAX {jax.__version__}"
    except Exception as e:  # the report is written whatever the cause
        where = f"devices unknown ({type(e).__name__}: {e})"
    return f"{where}; Python {platform.python_version()}; {os.cpu_count()} CPU cores"


def python_on_path(folder: str) -> dict:
    """The environment with this interpreter as `python` (run_nav.sh calls `python`)."""
    shim = os.path.join(folder, "python")  # a script, not a link: a link to a venv's python loses the venv
    with open(shim, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    os.chmod(shim, 0o755)
    return dict(os.environ, PATH=folder + os.pathsep + os.environ.get("PATH", ""))


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# The pipeline: stages, progress, Table 1's row
# ----------------------------------------------------------------------------------------------

def pipeline_stages(text: str, seconds: float, units: dict) -> list:
    """One row per stage of run_nav.sh's output: (stage, wall time, how far, time left by its progress line or
    None, training time extrapolated from the 10-seed unit benchmark or None). ``units`` {bench stage: seconds}."""
    took = {name: int(s) for name, s in re.findall(r"^=== (\w+) took (\d+) s", text, re.M)}
    started = set(re.findall(r"^=== (\w+): ", text, re.M))
    rows = []
    for stage, bench_name in STAGES.items():
        extrapolated = units.get(bench_name)
        if stage in took:
            rows.append((stage, f"{took[stage]} s", "done", 0.0, extrapolated))
            continue
        if stage not in started:
            rows.append((stage, "–", "not started", None, extrapolated))
            continue
        wall = f"{max(0.0, seconds - sum(took.values())):.0f} s (stopped)"
        progress = re.findall(rf"^\[{stage}\] (\d+)/(\d+) \((\d+)%\) elapsed (\d+)s, left ~(\d+)s", text, re.M)
        if not progress:
            rows.append((stage, wall, "started, no progress line yet (loading or compiling)", None, extrapolated))
            continue
        done, total, pct, elapsed, left = progress[-1]
        if done == total:
            how = f"{done}/{total} units of training done; stopped in its evaluation or writing"
        else:
            how = f"{done}/{total} units ({pct}%) after {elapsed} s of training"
        rows.append((stage, wall, how, float(left), extrapolated))
    return rows


def table1_row(run: str, check: Check, timeout: float) -> list:
    """Table 1's header and EMPO K=2 rows (both protocols) of the run, as scripts/table1.py prints them."""
    path = os.path.join(run, "highlevel.npz")
    if not os.path.isfile(path):
        return ["Not computed: stage 3 did not write highlevel.npz in the pipeline's share."]
    status, _, text = check.run("table1", [sys.executable, os.path.join(ROOT, "scripts", "table1.py"),
                                           "--empo-k2", path, "--out", os.path.join(run, "table1")], timeout)
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("| algorithm |")), None)
    if status != "ok" or first is None:
        return [f"scripts/table1.py {status}:", "", *[f"    {line}" for line in lines[-10:]]]
    table = lines[first:first + 2]  # its first table (the corridor table follows): the header and the EMPO rows
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        table += [line] if line.startswith("| EMPO K=2 |") else []
    return table


def pipeline_report(size: str, status: str, seconds: float, text: str, share: float, units: dict) -> tuple:
    """The report's lines on the pipeline, and its stages as {stage: row} for the JSON."""
    env = PIPELINE[size]
    what = "the paper's full schedules (run_nav.sh defaults)" if size == "full" else "tiny sizes, reduced schedules"
    lines = [f"## Navigation pipeline, {env['SEEDS']} seeds, {what}: {status}, {seconds:.0f} s (share {share:.0f} s)",
             "", f"| stage | wall time | how far | training time extrapolated from the {env['SEEDS']}-seed units "
                 "| flags |", "|---|---|---|---|---|"]
    flags = {"data": "DATA_ARGS", "cluster": "CLUSTER_ARGS", "ppo": "PPO_ARGS", "highlevel": "HIGHLEVEL_ARGS"}
    rows = pipeline_stages(text, seconds, units)
    for stage, wall, how, _, extrapolated in rows:
        extra = "–" if extrapolated is None else f"{extrapolated:.0f} s"
        lines.append(f"| {stage} | {wall} | {how} | {extra} | `{env[flags[stage]] or '(defaults)'}` |")
    if status != "ok":
        left = [(stage, own, extrapolated) for stage, _, how, own, extrapolated in rows if how != "done"]
        parts = [f"{stage}: ~{own:.0f} s by its own progress line" if own is not None else
                 f"{stage}: ~{extrapolated:.0f} s of training by the units" if extrapolated is not None else
                 f"{stage}: unknown" for stage, own, extrapolated in left]
        known = [own if own is not None else extrapolated for _, own, extrapolated in left]
        total = f"~{sum(known):.0f} s" if all(k is not None for k in known) else "unknown"
        lines += ["", f"Time left by extrapolation: {total} ({'; '.join(parts)}; start-up, compilation and "
                      "evaluation of the stages not started are not counted)."]
    results = [line for line in text.splitlines() if "rand index" in line or "final policy" in line.lower()]
    lines += ["", *[f"    {line.strip()}" for line in results[-4:]], ""]
    if status != "ok":
        lines += ["The end of its output:", "", *[f"    {line[:300]}" for line in text.splitlines()[-30:]], ""]
    return lines, {stage: {"wall": wall, "how_far": how, "left_s": own, "units_training_s": extrapolated}
                   for stage, wall, how, own, extrapolated in rows}


# ----------------------------------------------------------------------------------------------
# The units and the seeds scaling
# ----------------------------------------------------------------------------------------------

def stage_times(path: str) -> dict:
    """{unit: stage seconds per call} of a bench_stages --json file ({} when it is missing)."""
    report = read_json(path) or {}
    return {r["unit"]: r["stage_s"] for r in report.get("results", []) if r.get("stage_s")}


def scaling_table(times: dict, steps: dict, units: tuple) -> tuple:
    """The seeds-scaling table of ``units`` from {seeds: {unit: seconds per call}}: markdown lines, JSON rows."""
    counts = sorted(times)
    lines = ["| unit | steps / call | " + " | ".join(f"s / call, {s} seed(s)" for s in counts) + " | "
             + " | ".join(f"s / call / seed, {s}" for s in counts)
             + f" | time per call above {SCALING_FACTOR}x the 1-seed time |",
             "|---|---|" + "---|" * (2 * len(counts) + 1)]
    rows = []
    for unit in units:
        t = {s: times[s].get(unit) for s in counts}
        grows = "1-seed time not measured"
        if t[counts[0]] is not None:
            limit = SCALING_FACTOR * t[counts[0]]
            grows = f"not by {counts[-1]} seeds"
            for lo, hi in zip(counts, counts[1:]):
                if t[hi] is None:
                    grows = f"not by {lo} seeds; {hi} not measured"
                    break
                if t[hi] > limit:  # linear between the two counts that straddle the limit
                    at = lo + (limit - t[lo]) / (t[hi] - t[lo]) * (hi - lo) if t[hi] > t[lo] else hi
                    grows = f"between {lo} and {hi} seeds (about {max(at, lo):.0f} by linear interpolation)"
                    break
        cell = lambda x, spec: "–" if x is None else format(x, spec)
        lines.append(f"| {unit} | {cell(steps.get(unit), ',')} | " + " | ".join(cell(t[s], ".4g") for s in counts)
                     + " | " + " | ".join(cell(t[s] and t[s] / s, ".3g") for s in counts) + f" | {grows} |")
        rows.append({"unit": unit, "seconds_per_call": {str(s): t[s] for s in counts}, "grows": grows})
    return lines, rows


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

def run_parts(check: Check, size: str, out_dir: str, tmp: str) -> dict:
    """Every part in turn (the pipeline, Table 1's row, the units, the seeds scaling); their results."""
    cfg, flops = UNITS[size], dict(FLOPS)
    sizes = ["--rows", str(cfg["rows"]), "--steps-per-call", str(cfg["steps_per_call"])]
    if size == "tiny":  # the GPU check reads the committed files; the smoke test counts its own, at its sizes
        flops = {"nav": os.path.join(tmp, "flops_nav.json")}
        check.run("FLOPs (tiny: counted here)", [sys.executable, BENCH, "--flops-only", "--no-floor", "--size", "nav",
                                                 *sizes, "--units", *cfg["units"], "--json", flops["nav"]], 600)
    # 1. The navigation pipeline, then Table 1's row of its run.
    run = os.path.join(tmp, "run")
    env = dict(python_on_path(tmp), RUN=run, DATA=os.path.join(tmp, "nav.npz"), **PIPELINE[size])
    share = check.share("pipeline")
    pipeline = (*check.run("navigation pipeline", ["bash", os.path.join(ROOT, "scripts", "run_nav.sh")], share, env),
                share)
    table1 = table1_row(run, check, max(check.share("table1"), 10.0))
    # 2. The units, each size and seed count in its own process; 3. the seeds scaling: more seeds, a few units.
    units, files = [], {}
    for bench_size, seeds, name in (*cfg["parts"], (*cfg["scaling"][:2], "scaling")):
        share = check.share(name)
        files[bench_size, seeds] = os.path.join(out_dir, f"bench_stages_{bench_size}_seeds{seeds}.json")
        if os.path.exists(files[bench_size, seeds]):  # an earlier check's: not to be read as this one's
            os.remove(files[bench_size, seeds])
        # --time-limit: no unit starts in the last 15 s (the longest unit's compilation and calls on the H100)
        cmd = [sys.executable, BENCH, "--size", bench_size, *sizes, "--seeds", str(seeds), "--no-floor",
               "--flops-from", flops[bench_size], "--json", files[bench_size, seeds],
               "--time-limit", f"{max(share - min(15.0, share / 4), 1.0):.0f}", *cfg["flags"]]
        chosen = cfg["scaling"][2] if name == "scaling" else cfg["units"]
        label = f"seeds scaling, {bench_size}, {seeds} seeds" if name == "scaling" else \
            f"units, {bench_size}, {seeds} seed(s)"
        units.append((bench_size, seeds, name, *check.run(label, cmd + (["--units", *chosen] if chosen else []),
                                                          share), share))
    for leftover in glob.glob(os.path.join(out_dir, "*.tmp")):  # a part stopped while writing its JSON
        os.remove(leftover)
    return dict(pipeline=pipeline, table1=table1, units=units, files=files)


def write_report(check: Check, size: str, out_dir: str, started: str, parts: dict) -> str:
    """device_check.md and device_check.json from the parts' results; returns the report's path."""
    cfg, files, where = UNITS[size], parts["files"], machine()
    ten = int(PIPELINE[size]["SEEDS"])  # the pipeline's seed count: one of the unit parts' at the nav size
    schedules = (read_json(files.get(("nav", ten), "")) or {}).get("schedules", {}).get("nav", [])
    units_s = {row["stage"]: row["stage_s"] for row in schedules if row["stage_s"]}
    probes = {f"{b}, {s} seed(s)": (read_json(path) or {}).get("probes_compiled") for (b, s), path in files.items()}
    source = (", ".join(os.path.relpath(p, ROOT) for p in FLOPS.values()) if size == "full"
              else "a file counted first by bench_stages.py --flops-only")
    report = [f"# Device check ({size})", "", f"{started}; {where}", "",
              f"Budget: {check.budget:.0f} s for the parts, each part a share of what is left (SHARES in "
              f"scripts/device_check.py); the parts took {time.perf_counter() - check.start:.0f} s.",
              f"FLOPs per call: from {source}, multiplied by the seeds; FLOP probes compiled on this machine: "
              + ", ".join(f"{k} {'unknown' if v is None else v}" for k, v in probes.items()) + ".", ""]
    lines, stages = pipeline_report(size, *parts["pipeline"], units_s)
    report += [*lines, "### Table 1's EMPO K=2 row of this run (scripts/table1.py --empo-k2 RUN/highlevel.npz)", "",
               *parts["table1"], ""]
    for bench_size, seeds, name, status, seconds, text, share in parts["units"]:
        what = "Seeds scaling" if name == "scaling" else "Units"
        report += [f"## {what}, {bench_size}, {seeds} seed(s), {cfg['rows']:,} rows, the stage alone: {status}, "
                   f"{seconds:.0f} s (share {share:.0f} s)", "", tables(text, status), ""]
    bench_size, seeds, scaled = cfg["scaling"]
    times = {s: stage_times(path) for (b, s), path in sorted(files.items()) if b == bench_size}
    steps = {r["unit"]: r["steps_per_call"] for path in files.values()
             for r in (read_json(path) or {}).get("results", [])}
    lines, scaling = scaling_table(times, steps, scaled)
    report += [f"## Seeds scaling, {bench_size}: seconds per call of the stage with 1 to {seeds} vmapped seeds", "",
               f"The 1- and {ten}-seed times come from the unit parts above. The time per call starts to grow at the "
               f"first seed count whose time is above {SCALING_FACTOR}x the 1-seed time.", "", *lines, ""]
    path = os.path.join(out_dir, "device_check.md")
    with open(path, "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(out_dir, "device_check.json"), "w") as f:
        json.dump({"size": size, "started": started, "machine": where, "budget_s": check.budget,
                   "seconds": round(time.perf_counter() - check.start, 1), "parts": check.parts,
                   "probes_compiled": probes, "pipeline": stages, "table1": parts["table1"], "scaling": scaling},
                  f, indent=1)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the report (device_check.md, .json, .log and the "
                                                     "benchmarks' JSON: at most 8 files, as the device tool returns)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every step on a CPU")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together, shared as SHARES says (default 550; with --tiny 3600, "
                             "where the steps matter, not the time)")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out} is a file, not a folder")
    if args.budget is not None and not args.budget > 0:
        sys.exit("error: --budget must be a positive number of seconds")
    size = "tiny" if args.tiny else "full"
    for path in ([] if args.tiny else FLOPS.values()):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} is missing: count the FLOPs first (python bench/bench_stages.py --flops-only)")
    os.makedirs(args.out, exist_ok=True)
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    check = Check(args.budget or (3600.0 if args.tiny else 550.0), os.path.join(args.out, "device_check.log"))
    with tempfile.TemporaryDirectory() as tmp:
        parts = run_parts(check, size, args.out, tmp)
    path = write_report(check, size, args.out, started, parts)
    check.log.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
