"""The bad-input campaign: every entry point run as a user would run it, with hostile flags and swapped files.

For every flag of every script (nav_env.py, the three stages, the two baselines) the campaign tries 0, -1, NaN,
inf and an absurdly large value (numbers), an empty path, a folder, a missing file and every other kind of file
(paths), each on top of a tiny schedule, in a scratch folder where every input and an earlier output exist. Each
case is classified by what the user sees:

    sentence    exit status != 0 and one line on stderr (``error: ...`` or tyro's usage message), no traceback
    traceback   a Python traceback reached the user
    ran         exit status 0 (the value is legitimate, or is accepted)
    timeout     still running after --timeout seconds (a legitimately long run, e.g. 10^12 steps)

and checked for what it left: every input byte-identical, and the earlier output either byte-identical (the run
failed) or replaced by a valid, finite file (it ran). The table goes to stdout (markdown) and --json.

    python scripts/bad_input_campaign.py --json runs/bad_input_campaign.json     # about 20 min on 2 cores
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
}
MODULES = {"nav_env.py": "nav_env", "empo_cluster.py": "empo_cluster", "empo_ppo.py": "empo_ppo",
           "empo_highlevel.py": "empo_highlevel", "baselines/bc.py": "baselines.bc",
           "baselines/td3_bc.py": "baselines.td3_bc"}
INPUT_FLAGS = {"dataset": "data.npz", "cluster": "cluster.npz", "ppo": "ppo.npz"}
SCHEMA = {"nav_env.py": "empo/dataset/v1", "empo_cluster.py": "empo/cluster/v1", "empo_ppo.py": "empo/ppo/v1",
          "empo_highlevel.py": "empo/highlevel/v1", "baselines/bc.py": "empo/bc/v1",
          "baselines/td3_bc.py": "empo/td3_bc/v1"}


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
    files = ["data.npz", "cluster.npz", "ppo.npz", "highlevel.npz", "bc.npz", "td3_bc.npz", "random.npz",
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
            "baselines/td3_bc.py": ["--dataset", "data.npz", "--out", "out.npz"]}[script]
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
        for i, (script, label, extra) in enumerate(todo):
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
