"""The bad-input campaign: every entry point run as a user would run it, with hostile flags and swapped files.

For every flag of every script (nav_env.py, the three stages, the three baselines) the campaign tries 0, -1, NaN,
inf and an absurdly large value (numbers), an empty path, a folder, a missing file and every other kind of file
(paths), each on top of a tiny schedule, in a scratch folder where every input and an earlier output exist. Each
case is classified by what the user sees:

    sentence    exit status != 0 and one line on stderr (``error: ...`` or tyro's usage message), no traceback
    traceback   a Python traceback reached the user
    ran         exit status 0 (the value is legitimate, or is accepted)
    timeout     still running after --timeout seconds (a legitimately long run, e.g. 10^12 steps)

and checked for what it left: every input byte-identical, and the earlier output either byte-identical (the run
failed) or replaced by a valid, finite file (it ran). The table goes to stdout (markdown) and --json.

Faults in time, each a real subprocess, labelled so that ``--only`` picks a class:

    signal      SIGINT at 0.5 s (the imports), at 3 s (the compile) and once the checkpoint exists, SIGTERM and
                SIGKILL once it exists, for every script; then --resume: one sentence and status 130 / 143 (none
                for SIGKILL), never a traceback, 'Exception ignored' or a segfault; the resumed output valid
    disk        a tmpfs of 60k / 100k / 165k (root only, else skipped with the reason) that the output, a figure
                or the TensorBoard events fill: one sentence and status != 0, no partial image or temporary file
    absurd      finite but absurd data (actions 1e20, rewards 1e38, observations 1e7) and a checkpoint edited to
                hold NaN: one sentence that names the array or says the checkpoint holds NaN ("misleading" else)
    concurrent  two stage-1 runs with one --out started together; two --k auto runs with different --out in one
                folder (reported as "mixed" when one's fits land in the other's output)

    python scripts/bad_input_campaign.py --json runs/bad_input_campaign.json     # about 20 min on 2 cores
    python scripts/bad_input_campaign.py --only signal --only disk --only absurd --only concurrent
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import typing

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {  # a tiny schedule for each script, so that the cases that run finish in seconds
    "nav_env.py": ["--transitions-per-behaviour", "2000"],
    "empo_cluster.py": ["--bias-epochs", "1", "--pretrain-epochs", "1", "--em-epochs", "1", "--hidden-dim", "16"],
    "empo_ppo.py": ["--q-steps", "200", "--steps-per-call", "100", "--v-epochs", "1", "--pi-epochs", "1",
                    "--eval-episodes", "2"],
    "empo_highlevel.py": ["--steps", "200", "--steps-per-call", "100", "--eval-episodes", "2"],
    "baselines/bc.py": ["--steps", "200", "--steps-per-call", "100", "--eval-episodes", "2", "--hidden-dim", "16"],
    "baselines/td3_bc.py": ["--steps", "200", "--steps-per-call", "100", "--eval-episodes", "2", "--hidden-dim", "16"],
    "baselines/iql.py": ["--steps", "200", "--steps-per-call", "100", "--eval-episodes", "2", "--hidden-dim", "16"],
}
MODULES = {"nav_env.py": "nav_env", "empo_cluster.py": "empo_cluster", "empo_ppo.py": "empo_ppo",
           "empo_highlevel.py": "empo_highlevel", "baselines/bc.py": "baselines.bc",
           "baselines/td3_bc.py": "baselines.td3_bc", "baselines/iql.py": "baselines.iql"}
INPUT_FLAGS = {"dataset": "data.npz", "cluster": "cluster.npz", "ppo": "ppo.npz"}
SCHEMA = {"nav_env.py": "empo/dataset/v1", "empo_cluster.py": "empo/cluster/v1", "empo_ppo.py": "empo/ppo/v1",
          "empo_highlevel.py": "empo/highlevel/v1", "baselines/bc.py": "empo/bc/v1",
          "baselines/td3_bc.py": "empo/td3_bc/v1", "baselines/iql.py": "empo/iql/v1"}


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def prepare(work: pathlib.Path) -> None:
    """The inputs every case starts from: a tiny data set and each script's output on it."""
    run = lambda script, *a: subprocess.run([sys.executable, str(ROOT / script), *a, *TINY[script]], cwd=work,
                                            check=True, capture_output=True)
    run("nav_env.py", "--out", "data.npz")
    run("empo_cluster.py", "--dataset", "data.npz", "--out", "cluster.npz")
    run("empo_ppo.py", "--dataset", "data.npz", "--cluster", "cluster.npz", "--out", "ppo.npz")
    run("empo_highlevel.py", "--dataset", "data.npz", "--cluster", "cluster.npz", "--ppo", "ppo.npz",
        "--out", "highlevel.npz")
    run("baselines/bc.py", "--dataset", "data.npz", "--out", "bc.npz")
    run("baselines/td3_bc.py", "--dataset", "data.npz", "--out", "td3_bc.npz")
    run("baselines/iql.py", "--dataset", "data.npz", "--out", "iql.npz")
    (work / "random.npz").write_bytes(os.urandom(4096))
    (work / "empty.npz").write_bytes(b"")
    (work / "text.npz").write_text("not an npz file\n")
    (work / "folder").mkdir()
    import numpy as np

    np.save(work / "array.npy", np.zeros(3))


def cases(script: str):
    """(label, extra flags) for every flag of the script's Args."""
    import importlib

    args_class = importlib.import_module(MODULES[script]).Args
    hints = typing.get_type_hints(args_class)
    files = ["data.npz", "cluster.npz", "ppo.npz", "highlevel.npz", "bc.npz", "td3_bc.npz", "iql.npz", "random.npz",
             "empty.npz", "text.npz", "array.npy", "folder", "missing.npz", ""]
    for field in dataclasses.fields(args_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if field.name == "preset" or kind is bool:
            continue
        if field.name in INPUT_FLAGS or field.name == "out":
            for name in files:
                if name != INPUT_FLAGS.get(field.name):
                    yield f"{flag} {name or chr(34) * 2}", [flag, name]
        elif kind is int or kind is float or kind == typing.Optional[float]:
            values = ["0", "-1", "1e300", "nan", "inf", "-inf"] if kind is not int else ["0", "-1", str(10 ** 12)]
            for value in values:
                yield f"{flag} {value}", [flag, value]
        elif field.name == "minari_id":
            for value in ["no version", "a/b-vx", "empo/campaign-v0"]:
                yield f"{flag} '{value}'", [flag, value]
        elif field.name == "figure":
            for value in ["data.npz", "folder", ""]:
                yield f"{flag} {value or chr(34) * 2}", [flag, value]


def base_args(script: str) -> list:
    args = {"nav_env.py": ["--out", "out.npz"],
            "empo_cluster.py": ["--dataset", "data.npz", "--out", "out.npz"],
            "empo_ppo.py": ["--dataset", "data.npz", "--cluster", "cluster.npz", "--out", "out.npz"],
            "empo_highlevel.py": ["--dataset", "data.npz", "--cluster", "cluster.npz", "--ppo", "ppo.npz",
                                  "--out", "out.npz"],
            "baselines/bc.py": ["--dataset", "data.npz", "--out", "out.npz"],
            "baselines/td3_bc.py": ["--dataset", "data.npz", "--out", "out.npz"],
            "baselines/iql.py": ["--dataset", "data.npz", "--out", "out.npz"]}[script]
    return args + TINY[script]


def output_valid(path: pathlib.Path, schema: str) -> bool:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f["schema"]) == schema and all(
                np.all(np.isfinite(f[k])) for k in f.files if f[k].dtype.kind == "f")
    except Exception:
        return False


class _Timeout(BaseException):
    pass


def run_in_process(script: str, argv: list, case_dir: pathlib.Path, env: dict, timeout: float):
    """The script's command line (tyro, then its run(main, args)) in this process: (exit status, stderr).

    Faster than a fresh interpreter per case (imports and compilations are shared), and the same code path:
    only the interpreter start-up is left out. A case still running after ``timeout`` seconds is stopped by an
    alarm at its next Python instruction."""
    import contextlib
    import importlib
    import io
    import signal
    import traceback

    module = importlib.import_module(MODULES[script])
    err = io.StringIO()
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(case_dir)
    os.environ.update(env)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
    signal.alarm(int(timeout))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if script == "nav_env.py":
                args = module.tyro.cli(module.Args, args=argv)
                try:
                    module.main(args)
                except module.InputError as e:
                    sys.exit(f"error: {e}")
            else:
                module.run(module.main, _cli(module, argv))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            err.write(str(e.code) + "\n")
    except _Timeout:
        status = None
    except BaseException:
        err.write(traceback.format_exc())
        status = 1
    finally:
        signal.alarm(0)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return status, err.getvalue()


def _cli(module, argv: list):
    """The script's cli(Args, PRESETS) on argv instead of sys.argv."""
    saved = sys.argv
    sys.argv = [module.__name__, *argv]
    try:
        return module.cli(module.Args, module.PRESETS)
    finally:
        sys.argv = saved


def run_case(work: pathlib.Path, script: str, extra: list, timeout: float, in_process: bool) -> dict:
    case_dir = pathlib.Path(tempfile.mkdtemp(dir=work, prefix="case-"))
    for name in os.listdir(work):
        source = work / name
        if source.is_file():
            shutil.copy2(source, case_dir / name)
        elif name == "folder":
            (case_dir / name).mkdir()
    shutil.copy2(work / INPUT_FLAGS.get("ppo"), case_dir / "out.npz")  # an earlier output, to be kept or replaced
    before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file() and p.suffix in (".npz", ".npy")}
    env = dict(os.environ, MINARI_DATASETS_PATH=str(case_dir / "minari"))
    (case_dir / "minari" / "empo").mkdir(parents=True)
    (case_dir / "minari" / "empo" / "campaign-v0").mkdir()  # an id that is taken
    # The last occurrence of a flag wins in tyro, so the bad value goes after the tiny schedule.
    command = [sys.executable, str(ROOT / script), *base_args(script), *extra]
    start = time.perf_counter()
    if in_process:
        status, stderr = run_in_process(script, command[2:], case_dir, env, timeout)
    else:
        try:
            done = subprocess.run(command, cwd=case_dir, capture_output=True, text=True, timeout=timeout, env=env)
            status, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as e:
            status, stderr = None, (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - start
    lines = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line
             and "warn(" not in line and "Warning" not in line]
    if status is None:
        outcome = "timeout"
    elif "Traceback" in stderr:
        outcome = "traceback"
    elif status == 0:
        outcome = "ran"
    else:
        outcome = "sentence"
    after = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file() and p.suffix in (".npz", ".npy")}
    final = lambda flag: next((command[i + 1] for i in range(len(command) - 2, -1, -1) if command[i] == flag), None)
    out_name = final("--out")
    inputs = {final("--" + flag) for flag in INPUT_FLAGS}
    # Every file but the output must be left alone; the output too when it is one of the inputs.
    inputs_kept = all(after.get(name) == digest for name, digest in before.items()
                      if name != out_name or name in inputs)
    if outcome == "ran":
        out_ok = output_valid(case_dir / out_name, SCHEMA[script])
    else:
        out_ok = after.get(out_name, "-") == before.get(out_name, "-")
    message = next((line for line in reversed(lines) if line.startswith("error") or line.startswith("interrupted")),
                   lines[-1] if lines else "")
    shutil.rmtree(case_dir, ignore_errors=True)
    return dict(script=script, case=" ".join(extra) or "(none)", outcome=outcome, status=status,
                inputs_kept=inputs_kept, out_ok=out_ok, seconds=round(seconds, 1), message=message[:160])


# ----------------------------------------------------------------------------------------------
# Faults in time: signals, a disk that fills, absurd data, runs at once (labels 'signal', 'disk', 'absurd',
# 'concurrent'). Each is a real subprocess; what it leaves is checked as above.
# ----------------------------------------------------------------------------------------------

STAGES = [s for s in TINY if s != "nav_env.py"]
SIGNAL_POINTS = [("SIGINT", "0.5s"), ("SIGINT", "3s"), ("SIGINT", "checkpoint"), ("SIGTERM", "checkpoint"),
                 ("SIGKILL", "checkpoint")]


def fault_cases():
    """(label, function(work, timeout) -> result) for every fault class."""
    for script in TINY:
        for sig, when in SIGNAL_POINTS:
            if script != "nav_env.py" or when != "checkpoint":
                yield (f"signal {sig} at {when} {script}",
                       lambda w, t, s=script, g=sig, n=when: signal_case(w, t, s, g, n))
    for size in ("60k", "100k", "165k"):
        yield f"disk full ({size} tmpfs) empo_cluster.py", lambda w, t, z=size: disk_case(w, t, "empo_cluster.py", z)
    yield "disk full (200k tmpfs) nav_env.py --figure", lambda w, t: disk_case(w, t, "nav_env.py", "200k")
    for key, value in (("actions", 1e20), ("rewards", 1e38), ("observations", 1e7)):
        for script in ("empo_cluster.py", "baselines/bc.py"):
            yield f"absurd {key} {value:g} {script}", lambda w, t, s=script, k=key, v=value: absurd_case(w, t, s, k, v)
    yield "absurd checkpoint edited to NaN empo_cluster.py", absurd_checkpoint_case
    yield "concurrent two stage-1 runs, one --out", concurrent_same_out_case
    yield "concurrent two --k auto runs, one folder", concurrent_k_auto_case


def _scratch(work: pathlib.Path) -> pathlib.Path:
    case_dir = pathlib.Path(tempfile.mkdtemp(dir=work, prefix="fault-"))
    for name in ("data.npz", "cluster.npz", "ppo.npz"):
        shutil.copy2(work / name, case_dir / name)
    return case_dir


def _result(label: str, outcome: str, status, inputs_kept: bool, out_ok: bool, seconds: float, message: str):
    return dict(script="faults", case=label, outcome=outcome, status=status, inputs_kept=inputs_kept, out_ok=out_ok,
                seconds=round(seconds, 1), message=message[:400])


def _lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line and "warn(" not in line
            and "Warning" not in line]


def signal_case(work: pathlib.Path, timeout: float, script: str, sig: str, when: str) -> dict:
    """The script's tiny run, ``sig`` sent at ``when`` (seconds after the start, or once its checkpoint exists);
    then the same command with --resume, whose output must be valid. SIGINT and SIGTERM must end in one sentence
    (status 128 + signal), SIGKILL ends without one; never a traceback, 'Exception ignored' or a segfault."""
    import signal

    case_dir = _scratch(work)
    before = {p.name: sha(p) for p in case_dir.iterdir()}
    command = [sys.executable, str(ROOT / script), *base_args(script)]
    if script == "empo_cluster.py":
        command += ["--checkpoint-every", "1"]
    if script == "nav_env.py":  # a data set that takes a few seconds
        command += ["--transitions-per-behaviour", "200000"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=case_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    ckpt = case_dir / "out.checkpoint.npz"
    while process.poll() is None and time.perf_counter() - start < timeout:
        if (when == "checkpoint" and ckpt.exists()) or (when != "checkpoint"
                                                         and time.perf_counter() - start >= float(when[:-1])):
            process.send_signal(getattr(signal, sig))
            break
        time.sleep(0.05)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    status, lines = process.returncode, _lines(stderr)
    want = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[sig]
    clean = not any(bad in stderr for bad in ("Traceback", "Segmentation", "Exception ignored"))
    if status == 0:
        outcome = "ran"  # it finished before the signal came
    elif status == want and clean and (len(lines) == 1 if sig != "SIGKILL" else not lines):
        outcome = "sentence" if sig != "SIGKILL" else "killed"
    else:
        outcome = "traceback" if not clean else "bad"
    resumed = ""
    if script != "nav_env.py" and status != 0:  # --resume finishes the run from what was left
        done = subprocess.run(command + ["--resume"], cwd=case_dir, capture_output=True, text=True, timeout=timeout)
        resumed = f"; --resume: status {done.returncode}" + (" from the checkpoint" if "resumed from" in done.stdout
                                                             else " from the start")
        if done.returncode != 0 or "Traceback" in done.stderr:
            outcome = "bad"
        else:
            differ = differing_arrays(case_dir / "out.npz", work / OUTPUTS[script])
            resumed += ", output equal to the uninterrupted run's" if not differ else f", output differs in {differ}"
    out_ok = output_valid(case_dir / "out.npz", SCHEMA[script]) if (case_dir / "out.npz").exists() or \
        script != "nav_env.py" else True
    leftovers = [p.name for p in case_dir.iterdir() if p.name.endswith(".tmp")]
    inputs_kept = all(sha(case_dir / name) == digest for name, digest in before.items())
    message = (lines[-1] if lines else f"(no message, status {status})").replace(str(case_dir) + "/", "") + resumed + (
        f"; temporaries left {leftovers}" if leftovers else "")
    shutil.rmtree(case_dir, ignore_errors=True)
    return _result(f"signal {sig} at {when} {script}", outcome, status, inputs_kept, out_ok,
                   time.perf_counter() - start, message)


OUTPUTS = {"empo_cluster.py": "cluster.npz", "empo_ppo.py": "ppo.npz", "empo_highlevel.py": "highlevel.npz",
           "baselines/bc.py": "bc.npz", "baselines/td3_bc.py": "td3_bc.npz", "baselines/iql.py": "iql.npz"}


def differing_arrays(path: pathlib.Path, reference: pathlib.Path) -> list:
    """The arrays of two outputs of one command that differ (metadata and timings left out)."""
    import numpy as np

    with np.load(path) as a, np.load(reference) as b:
        keys = [k for k in a.files if k not in ("args", "inputs", "producer", "summary") and "seconds" not in k
                and not k.endswith("_s")]
        return [k for k in keys if k not in b.files or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]


def disk_case(work: pathlib.Path, timeout: float, script: str, size: str) -> dict:
    """The script's tiny run writing into a tmpfs of ``size`` (root only): the output, figures and TensorBoard
    events fill it. The run must succeed, or end in one sentence with status != 0; no partial image, no temporary
    file, and an output that is there is valid."""
    label = f"disk full ({size} tmpfs) {script}" + (" --figure" if script == "nav_env.py" else "")
    if os.geteuid() != 0 or not shutil.which("mount"):
        print(f"skipped {label}: mounting a tmpfs needs root", file=sys.stderr)
        return _result(label, "skipped", None, True, True, 0.0, "skipped: mounting a tmpfs needs root")
    case_dir = _scratch(work)
    disk = case_dir / "disk"
    disk.mkdir()
    start = time.perf_counter()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        return _result(label, "skipped", None, True, True, 0.0, "skipped: the tmpfs could not be mounted")
    try:
        before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file()}
        args = [a for a in base_args(script)]
        args[args.index("--out") + 1] = str(disk / "out.npz")
        if script == "nav_env.py":
            args += ["--figure", str(disk / "map.png")]
        done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=case_dir, capture_output=True,
                              text=True, timeout=timeout)
        lines = _lines(done.stderr)
        files = [p for p in disk.rglob("*") if p.is_file()]
        partial = [p.name for p in files if p.suffix == ".png" and p.stat().st_size == 0 or p.name.endswith(".tmp")]
        if "Traceback" in done.stderr or "Exception" in done.stderr:
            outcome = "traceback"
        elif done.returncode == 0:
            outcome = "ran"
        else:
            outcome = "sentence" if len(lines) == 1 and lines[0].startswith("error: ") else "bad"
        out_ok = not partial and (not (disk / "out.npz").exists() or output_valid(disk / "out.npz", SCHEMA[script]))
        inputs_kept = all(sha(case_dir / name) == digest for name, digest in before.items())
        message = (lines[-1] if lines else "(none)") + (f"; partial files {partial}" if partial else "")
        return _result(label, outcome, done.returncode, inputs_kept, out_ok, time.perf_counter() - start, message)
    finally:
        subprocess.run(["umount", str(disk)])
        shutil.rmtree(case_dir, ignore_errors=True)


def _refusal(label, case_dir, command, before, start, timeout, expect: str) -> dict:
    done = subprocess.run(command, cwd=case_dir, capture_output=True, text=True, timeout=timeout)
    lines = _lines(done.stderr)
    if "Traceback" in done.stderr:
        outcome = "traceback"
    elif done.returncode == 0:
        outcome = "ran"
    else:
        outcome = "sentence" if len(lines) == 1 and expect in lines[0] else "misleading"
    inputs_kept = all(sha(case_dir / name) == digest for name, digest in before.items())
    out_ok = sha(case_dir / "out.npz") == before.get("out.npz", "-")
    shutil.rmtree(case_dir, ignore_errors=True)
    return _result(label, outcome, done.returncode, inputs_kept, out_ok, time.perf_counter() - start,
                   lines[-1] if lines else "")


def absurd_case(work: pathlib.Path, timeout: float, script: str, key: str, value: float) -> dict:
    """A valid data-set file whose ``key`` holds a finite but absurd value: one sentence naming the array."""
    import numpy as np

    case_dir = _scratch(work)
    with np.load(case_dir / "data.npz") as f:
        arrays = dict(f)
    arrays[key].reshape(-1)[3] = value
    np.savez(case_dir / "absurd.npz", **arrays)
    before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file()}
    command = [sys.executable, str(ROOT / script), *base_args(script), "--dataset", "absurd.npz"]
    return _refusal(f"absurd {key} {value:g} {script}", case_dir, command, before, time.perf_counter(), timeout,
                    f"'{key}' holds")


def absurd_checkpoint_case(work: pathlib.Path, timeout: float) -> dict:
    """Stage 1 killed once its checkpoint exists, the checkpoint edited to hold NaN, then --resume: one sentence
    that says the checkpoint holds NaN."""
    import numpy as np

    case_dir = _scratch(work)
    start = time.perf_counter()
    command = [sys.executable, str(ROOT / "empo_cluster.py"), *base_args("empo_cluster.py"), "--checkpoint-every", "1"]
    process = subprocess.Popen(command, cwd=case_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = case_dir / "out.checkpoint.npz"
    while process.poll() is None and not ckpt.exists():
        time.sleep(0.05)
    process.kill()
    process.wait()
    if not ckpt.exists():
        return _result("absurd checkpoint edited to NaN empo_cluster.py", "skipped", None, True, True,
                       time.perf_counter() - start, "the run finished before its checkpoint could be taken")
    with np.load(ckpt) as f:
        arrays = dict(f)
    leaf = next(k for k in sorted(arrays) if k.startswith("leaf_") and arrays[k].dtype.kind == "f")
    arrays[leaf].reshape(-1)[0] = np.nan
    np.savez(ckpt, **arrays)
    before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file()}
    return _refusal("absurd checkpoint edited to NaN empo_cluster.py", case_dir, command + ["--resume"], before,
                    start, timeout, "holds NaN or infinite values")


def _together(case_dir: pathlib.Path, commands: list, timeout: float) -> list:
    processes = [subprocess.Popen(c, cwd=case_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in processes]


def concurrent_same_out_case(work: pathlib.Path, timeout: float) -> dict:
    """Two stage-1 runs with the same --out started together: each ends (status 0, or one sentence), the output is
    one run's whole file, and no temporary file is left."""
    case_dir = _scratch(work)
    start = time.perf_counter()
    before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file()}
    command = [sys.executable, str(ROOT / "empo_cluster.py"), *base_args("empo_cluster.py")]
    ends = _together(case_dir, [command, command], timeout)
    statuses = [status for status, _ in ends]
    clean = not any("Traceback" in err for _, err in ends)
    leftovers = [p.name for p in case_dir.iterdir() if p.name.endswith(".tmp") or "checkpoint" in p.name]
    out_ok = output_valid(case_dir / "out.npz", SCHEMA["empo_cluster.py"]) and not leftovers
    outcome = "ran" if clean and statuses == [0, 0] else ("sentence" if clean else "traceback")
    inputs_kept = all(sha(case_dir / name) == digest for name, digest in before.items())
    message = f"statuses {statuses}; left {leftovers or 'nothing else'}; " + " / ".join(
        (_lines(err) or ["-"])[-1] for _, err in ends)
    shutil.rmtree(case_dir, ignore_errors=True)
    return _result("concurrent two stage-1 runs, one --out", outcome, statuses, inputs_kept, out_ok,
                   time.perf_counter() - start, message)


def concurrent_k_auto_case(work: pathlib.Path, timeout: float) -> dict:
    """Two `--k auto` runs with different --out in one folder, started together, then the first alone in a folder
    of its own: reports what it sees. Unmixed, the first run's output equals its lone run's (the fits of K = 1..k_max
    under a.select_k/ are its own); "mixed" when the other run's fits changed it (they shared select_k/ before each
    output had a folder of its own)."""
    case_dir = _scratch(work)
    start = time.perf_counter()
    before = {p.name: sha(p) for p in case_dir.iterdir() if p.is_file()}
    base = [sys.executable, str(ROOT / "empo_cluster.py"), *base_args("empo_cluster.py"), "--k", "auto",
            "--k-max", "2", "--k-holdout", "0.3"]  # two of the tiny set's seven trajectories held out
    commands = [base + ["--out", "a.npz", "--seed", "1"], base + ["--out", "b.npz", "--seed", "2"]]
    ends = _together(case_dir, commands, timeout)
    statuses = [status for status, _ in ends]
    clean = not any("Traceback" in err for _, err in ends)
    valid = [output_valid(case_dir / name, SCHEMA["empo_cluster.py"]) for name in ("a.npz", "b.npz")]
    alone = case_dir / "alone"
    alone.mkdir()
    shutil.copy2(case_dir / "data.npz", alone / "data.npz")
    subprocess.run(commands[0], cwd=alone, capture_output=True, timeout=timeout)
    differ = differing_arrays(case_dir / "a.npz", alone / "a.npz") if all(valid) else ["(no valid output)"]
    fits = sorted(str(p.relative_to(case_dir)) for p in case_dir.glob("*select_k/**/*.npz"))
    mixed = bool(differ) or not all(valid)
    outcome = "traceback" if not clean else ("mixed" if mixed else ("ran" if statuses == [0, 0] else "sentence"))
    inputs_kept = all(sha(case_dir / name) == digest for name, digest in before.items())
    message = (f"statuses {statuses}, outputs valid {valid}; a.npz differs from its lone run in {differ or 'nothing'}"
               f"; shared fits {fits}; " + " / ".join((_lines(err) or ["-"])[-1] for _, err in ends))
    shutil.rmtree(case_dir, ignore_errors=True)
    return _result("concurrent two --k auto runs, one folder", outcome, statuses, inputs_kept, not mixed,
                   time.perf_counter() - start, message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per case")
    parser.add_argument("--only", action="append", help="run only the cases whose script or label contains this "
                                                         "text (repeatable: any of them)")
    parser.add_argument("--in-process", action="store_true",
                        help="run each case's command line in this process (several times faster; the interpreter's "
                             "start-up is the only part left out)")
    opts = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bad_input_campaign-"))
    try:
        prepare(work)
        results = []
        todo = [(script, label, extra) for script in TINY for label, extra in cases(script)
                if not opts.only or any(text in script or text in label for text in opts.only)]
        todo += [("faults", label, fault) for label, fault in fault_cases()
                 if not opts.only or any(text in label for text in opts.only)]
        for i, (script, label, extra) in enumerate(todo):
            if script == "faults":  # a fault in time: always a real subprocess
                result = extra(work, opts.timeout)
            else:
                result = run_case(work, script, extra, opts.timeout, opts.in_process)
            results.append(result)
            print(f"[{i + 1}/{len(todo)}] {script} {label}: {result['outcome']} "
                  f"(inputs kept {result['inputs_kept']}, output ok {result['out_ok']}) {result['message']}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| script | case | outcome | inputs kept | earlier output kept / new output valid | what the user read |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['script']} | `{r['case']}` | {r['outcome']} | {r['inputs_kept']} | {r['out_ok']} | "
              f"{r['message'].replace('|', '/')} |")
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    bad = [r for r in results if r["outcome"] == "traceback" or not r["inputs_kept"] or not r["out_ok"]]
    print(f"\n{len(results)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; {len(bad)} with a traceback, a changed input or a bad output")
    if opts.json:
        pathlib.Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(opts.json).write_text(json.dumps(results, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
