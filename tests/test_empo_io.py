"""empo_io.py's promises (docs/reliability.md, "Nothing lost" and "Bad input"), each tested once, directly.

Small arrays and tiny dataclasses made here, no training: the file runs in seconds. What a stage adds (passing its
inputs to check_writable, refusing its flags before any work, resuming to the result of an uninterrupted run) is
tested with the stage, in its own test file and in test_bad_input.py.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import empo_io

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = empo_io.DATASET_SCHEMA


def refused(match: str, fn, *args, **kwargs) -> str:
    """fn(*args) raises InputError: one sentence that matches ``match``; returns it."""
    with pytest.raises(empo_io.InputError, match=match) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def tiny_dataset(obs_dim: int = 2, act_dim: int = 2) -> dict:
    """Two trajectories of three rows (schema empo/dataset/v1): the first ends in a terminal, the second in a
    timeout; behaviours 0 and 1."""
    n = 6
    rng = np.random.default_rng(0)
    return dict(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.normal(size=(n, act_dim)).astype(np.float32),
        rewards=-np.ones(n, np.float32),
        next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminals=np.array([0, 0, 1, 0, 0, 0], bool),
        timeouts=np.array([0, 0, 0, 0, 0, 1], bool),
        episode_ids=np.array([0, 0, 0, 1, 1, 1], np.int32),
        behaviour=np.array([0, 0, 0, 1, 1, 1], np.int32),
    )


def listing(folder) -> list:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------
# Handoffs: written whole, beside the target, never over an input, never with NaN
# ----------------------------------------------------------------------------------------------

def test_a_handoff_holds_the_arrays_and_its_metadata_and_is_read_without_pickles(tmp_path):
    path = tmp_path / "x.npz"
    arrays = {"policy/params/Dense_0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
              "assignments": np.array([1, 0], np.int32), "flags": np.array([True, False])}
    empo_io.save_npz(str(path), arrays, "empo/test/v1", {"lr": 0.1, "seed": 3}, inputs={"dataset": "ab" * 32})
    loaded, digest = empo_io.load_npz(str(path), "empo/test/v1", digest=True)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert loaded["schema"].shape == () and str(loaded["schema"]) == "empo/test/v1"
    assert json.loads(str(loaded["args"])) == {"lr": 0.1, "seed": 3}
    assert json.loads(str(loaded["inputs"])) == {"dataset": "ab" * 32}
    assert str(loaded["producer"]) == os.path.basename(sys.argv[0])
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # the bytes that were read
    refused(f"{path} has schema 'empo/test/v1', expected 'empo/other/v1'", empo_io.load_npz, str(path), "empo/other/v1")
    np.savez(tmp_path / "bare.npz", **arrays)  # no metadata at all
    refused(f"{tmp_path}/bare.npz has schema 'none', expected 'empo/test/v1'", empo_io.load_npz,
            str(tmp_path / "bare.npz"), "empo/test/v1")


def test_the_temporary_file_is_beside_the_target_named_with_the_pid_and_renamed_only_when_complete(
        tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    empo_io.save_npz(str(path), {"a": np.zeros(3, np.float32)}, "s", {})
    before = path.read_bytes()
    real_replace, seen = os.replace, []

    def replace(src, dst):  # the moment of the rename: the temporary is complete, the target still the old file
        seen.append(src)
        assert os.path.dirname(src) == str(tmp_path) and dst == str(path)
        assert os.path.basename(src).startswith(f".x.npz.{os.getpid()}.") and src.endswith(".tmp")
        assert path.read_bytes() == before
        with np.load(src, allow_pickle=False) as done:
            np.testing.assert_array_equal(done["a"], np.ones(1000, np.float32))
            assert str(done["schema"]) == "s"
        real_replace(src, dst)

    monkeypatch.setattr(empo_io.os, "replace", replace)
    empo_io.save_npz(str(path), {"a": np.ones(1000, np.float32)}, "s", {})
    monkeypatch.undo()
    assert len(seen) == 1 and listing(tmp_path) == ["x.npz"]
    np.testing.assert_array_equal(empo_io.load_npz(str(path), "s")["a"], np.ones(1000, np.float32))


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writer.kill()
    writer.wait()
    stale = tmp_path / f".x.npz.{writer.pid}.abc.tmp"  # a writer that was killed: no such process any more
    live = tmp_path / f".x.npz.{os.getpid()}.abc.tmp"  # a writer that still runs
    other = tmp_path / f".y.npz.{writer.pid}.abc.tmp"  # another file's temporary
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    empo_io.save_npz(str(tmp_path / "x.npz"), {"a": np.zeros(2)}, "s", {})
    assert not stale.exists() and live.exists() and other.exists()


def test_outputs_get_the_permissions_the_umask_gives(tmp_path):
    out = tmp_path / "x.npz"
    old = os.umask(0o022)
    try:
        empo_io.save_npz(str(out), {"a": np.zeros(2)}, "s", {})
        assert (out.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0o600
        os.umask(0o077)
        empo_io.save_npz(str(out), {"a": np.zeros(2)}, "s", {})
        assert (out.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("link", ["same path", "symbolic link", "hard link"])
def test_an_output_that_is_one_of_the_inputs_is_refused(tmp_path, link):
    source = tmp_path / "input.npz"
    source.write_bytes(b"precious input")
    out = {"same path": source, "symbolic link": tmp_path / "sym.npz", "hard link": tmp_path / "hard.npz"}[link]
    if link == "symbolic link":
        os.symlink(source, out)
    elif link == "hard link":
        os.link(source, out)
    before = listing(tmp_path)
    for inputs in ([str(source)], [f"{tmp_path}/other.npz,{source}"]):  # a path, or one of comma-joined paths
        refused(f"refusing to write {out}: it is the input {source}, which would be lost",
                empo_io.check_writable, str(out), inputs)
    assert source.read_bytes() == b"precious input" and listing(tmp_path) == before
    empo_io.check_writable(str(tmp_path / "new.npz"), [str(source)])  # another path is fine
    assert listing(tmp_path) == before  # and the check leaves nothing behind


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_array_with_nan_or_infinite_values_is_never_written_and_the_earlier_file_stays(tmp_path, bad):
    out = tmp_path / "good.npz"
    empo_io.save_npz(str(out), {"x": np.ones(3, np.float32)}, "s", {})
    before = out.read_bytes()
    refused(f"{out} was not written: 'params/w' contains NaN or infinite values .* left as it was",
            empo_io.save_npz, str(out), {"steps": np.arange(3), "params/w": np.array([1.0, bad], np.float32)}, "s", {})
    assert out.read_bytes() == before and listing(tmp_path) == ["good.npz"]


def test_a_full_disk_at_the_final_write_leaves_the_earlier_file(tmp_path, monkeypatch):
    out = tmp_path / "good.npz"
    empo_io.save_npz(str(out), {"x": np.ones(3, np.float32)}, "s", {"good": True})
    before = out.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(empo_io.np, "savez", disk_full)
    refused(f"cannot write {out}: No space left on device; an earlier file there is left as it was",
            empo_io.save_npz, str(out), {"x": np.zeros(3, np.float32)}, "s", {"good": False})
    monkeypatch.undo()
    assert out.read_bytes() == before and listing(tmp_path) == ["good.npz"]  # no temporary left behind


def test_a_full_disk_while_a_figure_is_written_leaves_no_partial_image(tmp_path, monkeypatch):
    """The figure's bytes go to a temporary file renamed into place only when complete (before: a 0-byte PNG and a
    traceback)."""
    from matplotlib.figure import Figure

    import nav_env

    path = tmp_path / "map.png"
    nav_env.plot_map(path=str(path))
    before = path.read_bytes()

    def disk_full(self, file, **kwargs):
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
            f.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    refused(f"cannot write {path}: No space left on device; no partial image was left", nav_env.plot_map,
            path=str(path))
    assert path.read_bytes() == before and listing(tmp_path) == ["map.png"]


def test_a_full_disk_under_the_tensorboard_events_ends_in_one_sentence_at_close(tmp_path, monkeypatch):
    """tensorboardX's thread keeps the error instead of dying with a traceback; close() says it (before: the run
    went on and ended with exit status 0)."""
    from tensorboardX import record_writer

    def disk_full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "flush", disk_full)
    writer = empo_io.make_writer(str(tmp_path / "tb"), Flags())
    for step in range(30):  # more events than tensorboardX's queue holds: the thread must keep taking them
        writer.add_scalar("charts/x", float(step), step)
    message = refused("cannot write the TensorBoard events .*events.out.tfevents.*: No space left on device; the "
                      "events before the error are kept", writer.close)
    assert str(tmp_path / "tb") in message


def test_an_output_path_that_names_no_file_or_cannot_be_written_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [("", "the output path '' names no file"), ("runs/", "the output path 'runs/' names no file"),
             (str(tmp_path), f"cannot write {tmp_path}: it is a folder"),
             (str(a_file / "x.npz"), f"cannot write {a_file}/x.npz: its folder {a_file} cannot be created")]
    for path, message in cases:
        refused(message, empo_io.check_writable, path)
        refused("names no file|cannot write", empo_io.save_npz, path, {"a": np.zeros(2)}, "s", {})
    assert a_file.read_text() == "keep me" and listing(tmp_path) == ["a_file"]  # no runs/ folder, no probe
    empo_io.check_writable("new/x.npz")  # a folder that does not exist yet is made
    assert listing(tmp_path) == ["a_file", "new"] and listing(tmp_path / "new") == []


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence that names the file and the problem
# ----------------------------------------------------------------------------------------------

class Unpickled:
    """Unpickling this makes a folder: a reader that unpickles leaves a trace."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_not_a_handoff(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(b"\x00\x01random bytes" * 50)
    elif kind == "a damaged zip":
        path.write_bytes(b"PK\x03\x04 a damaged zip")
    elif kind == "a cut .npz":
        np.savez(path, a=np.zeros(1000), schema=np.array(SCHEMA))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "a single .npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "a pickle":
        path.write_bytes(pickle.dumps(Unpickled(str(path.parent / "unpickled"))))
    elif kind == "a pickled array in an .npz":
        np.savez(path, rewards=np.array([Unpickled(str(path.parent / "unpickled"))], object),
                 schema=np.array(SCHEMA))
    elif kind == "a folder":
        path.mkdir()


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("a folder", "is a folder, not an .npz file"),
    ("random bytes", "is not an .npz file"), ("a damaged zip", "is not a readable .npz file"),
    ("a cut .npz", "is not a readable .npz file"), ("a single .npy", r"holds a single array \(.npy\), not an .npz"),
    ("a pickle", "is not an .npz file"), ("a pickled array in an .npz", "is not a readable .npz file"),
])
def test_a_file_that_is_not_a_handoff_gets_one_sentence_and_is_never_unpickled(tmp_path, kind, message):
    path = tmp_path / "x.npz"
    write_not_a_handoff(path, kind)
    text = refused(message, empo_io.load_npz, str(path), SCHEMA)
    assert str(path) in text
    if kind != "a pickled array in an .npz":  # (there numpy's reason, which names allow_pickle, is quoted)
        assert "allow_pickle" not in text  # not numpy's hint to load pickles
    assert not (tmp_path / "unpickled").exists()


def test_check_arrays_checks_keys_dtypes_symbolic_shapes_and_finiteness():
    spec = {"posterior": ("float32", ("E", "K")), "assignments": ("int32", ("N",)), "lengths": ("int32", ("E",))}
    good = {"posterior": np.full((3, 2), 0.5, np.float32), "assignments": np.zeros(7, np.int32),
            "lengths": np.ones(3, np.int32)}
    assert empo_io.check_arrays("c.npz", good, spec) == {"E": 3, "K": 2, "N": 7}
    cases = [
        (dict(good, posterior=None), "c.npz has no key 'posterior'"),
        (dict(good, assignments=np.zeros(7, np.int64)), "c.npz: 'assignments' has dtype int64, expected int32"),
        (dict(good, assignments=np.zeros((7, 1), np.int32)), r"'assignments' has shape \(7, 1\), expected 1 dim"),
        (dict(good, lengths=np.ones(4, np.int32)),  # E is 3 in 'posterior', 4 here
         r"c.npz: 'lengths' has shape \(4,\), expected \('E',\) with \{'E': 3, 'K': 2, 'N': 7\}"),
        (dict(good, posterior=np.array([[0.5, np.nan]] * 3, np.float32)), "'posterior' contains NaN or infinite"),
        (dict(good, posterior=np.array([[0.5, -np.inf]] * 3, np.float32)), "'posterior' contains NaN or infinite"),
    ]
    for arrays, message in cases:
        refused(message, empo_io.check_arrays, "c.npz", {k: v for k, v in arrays.items() if v is not None}, spec)
    refused(r"'posterior' has shape \(3, 2\), expected \('E', 'K'\) with \{'K': 4", empo_io.check_arrays, "c.npz",
            good, spec, sizes={"K": 4})  # sizes known from another file


def test_load_dataset_digests_the_arrays_not_the_file(tmp_path):
    data = tiny_dataset()
    empo_io.save_npz(str(tmp_path / "a.npz"), data, SCHEMA, {"seed": 0})
    empo_io.save_npz(str(tmp_path / "b.npz"), {**data, "extra": np.zeros(2)}, SCHEMA, {"other": "metadata"})
    loaded, digest = empo_io.load_dataset(str(tmp_path / "a.npz"))
    assert set(loaded) == set(empo_io.DATASET_SPEC)
    for key, value in data.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    want = hashlib.sha256(b"".join(np.ascontiguousarray(data[k]).tobytes() for k in empo_io.DATASET_SPEC))
    assert digest == want.hexdigest() == empo_io.load_dataset(str(tmp_path / "b.npz"))[1]
    data["rewards"][4] -= 1
    empo_io.save_npz(str(tmp_path / "c.npz"), data, SCHEMA, {})
    assert empo_io.load_dataset(str(tmp_path / "c.npz"))[1] != digest


def changed(key, fn):
    def change(data):
        data[key] = fn(data[key].copy())
        return data
    return change


def set_row(row, value):
    def fn(a):
        a[row] = value
        return a
    return fn


@pytest.mark.parametrize("change, message", [
    (lambda d: {k: v for k, v in d.items() if k != "rewards"}, "has no key 'rewards'"),
    (changed("observations", lambda a: a.astype(np.float64)), "'observations' has dtype float64, expected float32"),
    (changed("episode_ids", lambda a: a.astype(np.int64)), "'episode_ids' has dtype int64, expected int32"),
    (changed("rewards", lambda a: a[:-1]), r"'rewards' has shape \(5,\), expected \('N',\)"),
    (changed("next_observations", lambda a: a[:, :1]), r"'next_observations' has shape \(6, 1\)"),
    (changed("observations", set_row((4, 1), np.nan)), "'observations' contains NaN or infinite values"),
    (lambda d: {k: v[:0] for k, v in d.items()}, "holds no transitions"),
    (lambda d: {**d, "observations": np.zeros((6, 0), np.float32), "next_observations": np.zeros((6, 0), np.float32)},
     r"'observations' has no features \(shape \(6, 0\)\)"),
    (changed("actions", lambda a: a[:, :0]), "'actions' has no features"),
    (changed("episode_ids", lambda a: a + 1), "'episode_ids' must start at 0 and count up by one"),
    (changed("terminals", set_row(2, False)), "a trajectory ends with neither a terminal nor a timeout"),
    (changed("timeouts", set_row(1, True)), "a terminal or timeout flag stands inside a trajectory"),
    (changed("timeouts", set_row(2, True)), "both a terminal and a timeout flag"),
    # finite but absurd: float32 training would overflow (before: "did the run diverge?" at the end of the run)
    (changed("actions", set_row((2, 1), 1e20)),
     r"'actions' holds 1e\+20 at row 2, beyond \+-1e\+06, where float32 training overflows; rescale the data set"),
    (changed("rewards", set_row(4, -1e38)), r"'rewards' holds -1e\+38 at row 4"),
    (changed("next_observations", set_row((5, 0), 2e6)), r"'next_observations' holds 2e\+06 at row 5"),
])
def test_a_bad_data_set_gets_one_sentence_naming_the_file(tmp_path, change, message):
    path = tmp_path / "d.npz"
    np.savez(path, **change(tiny_dataset()), schema=np.array(SCHEMA))
    assert str(path) in refused(message, empo_io.load_dataset, str(path))


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    """An empty local Minari store, and no network."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    return tmp_path / "store"


@pytest.mark.parametrize("source, message", [
    ("folder", "folder is a folder, not an .npz file"),
    ("d.np", r"--dataset d.np: no such file \(a Minari id looks like 'namespace/name-v0'\)"),
    ("data set.npz", "data set.npz does not exist"),
    ("empo/absent-v0", r"'empo/absent-v0' is not stored locally; download it with `minari download empo/absent-v0`"),
    ("empo/broken-v0", r"Minari data set 'empo/broken-v0' could not be read \("),
])
def test_a_data_set_source_that_is_no_data_set_is_named_as_such(tmp_path, monkeypatch, minari_store, source,
                                                                 message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (minari_store / "empo" / "broken-v0" / "data").mkdir(parents=True)  # a damaged local copy
    (minari_store / "empo" / "broken-v0" / "data" / "main_data.hdf5").write_bytes(b"not hdf5")
    refused(message, empo_io.load_dataset, source)


# ----------------------------------------------------------------------------------------------
# Flags, memory, the command line
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Flags:
    """A tiny script's flags."""

    out: str = "x.npz"
    """the output"""
    seed: int = 0
    """the first seed"""
    num_seeds: int = 1
    """how many seeds"""
    learning_rate: float = 3e-4
    """a float flag"""
    steps: int = 10
    """an int flag"""
    verbose: bool = True
    """a bool flag (not an integer to check)"""


def test_check_flags_refuses_non_finite_numbers_int32_overflow_and_seeds_beyond_32_bits():
    empo_io.check_flags(Flags(seed=2**31 - 2, num_seeds=2, steps=2**31 - 1), at_least={"steps": 1})
    for value in (np.nan, np.inf, -np.inf):
        refused(f"--learning-rate must be a finite number, got {value}", empo_io.check_flags,
                Flags(learning_rate=float(value)))
    for steps in (2**31, -2**31):
        refused(f"--steps must be below 2\\^31, got {steps}", empo_io.check_flags, Flags(steps=steps))
    for seed, num_seeds in [(-1, 1), (2**31 - 1, 2), (2**31 - 10, 20), (2, 2**31 - 1)]:
        refused(f"--seed {seed} and --num-seeds {num_seeds} must keep every seed in 0..2\\^31-1",
                empo_io.check_flags, Flags(seed=seed, num_seeds=num_seeds))
    refused("--steps must be at least 1, got 0", empo_io.check_flags, Flags(steps=0), at_least={"steps": 1})


def test_check_fits_refuses_what_exceeds_the_memory():
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    empo_io.check_fits("--batch-size 10", have)
    refused(f"--batch-size 99 needs about .* GiB, more than this machine's {have / 2**30:.0f} GiB",
            empo_io.check_fits, "--batch-size 99", have + 1)


@pytest.fixture
def no_host_devices(monkeypatch):
    """empo_io.run without setting JAX's host device count: the test process's JAX keeps its own."""
    monkeypatch.setattr(empo_io, "host_devices", lambda: None)


def ended(main, args) -> str:
    """What empo_io.run(main, args) printed as it exited."""
    with pytest.raises(SystemExit) as exit_:
        empo_io.run(main, args)
    return str(exit_.value.code)


def raising(error):
    def main(args):
        raise error
    return main


def test_run_ends_bad_input_and_a_full_memory_in_one_sentence_and_keeps_other_tracebacks(no_host_devices):
    bad_input = empo_io.InputError("x.npz has no key 'rewards'")
    assert ended(raising(bad_input), Flags()) == "error: x.npz has no key 'rewards'"
    for error in (MemoryError("Unable to allocate 74.5 TiB"),
                  RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")):
        message = ended(raising(error), Flags())
        assert message.startswith(f"error: out of memory ({type(error).__name__}); lower the flags")
        assert "--num-seeds" in message and "\n" not in message
    with pytest.raises(ZeroDivisionError):
        empo_io.run(raising(ZeroDivisionError("a bug, not bad input")), Flags())


def test_ctrl_c_names_the_checkpoint(tmp_path, no_host_devices):
    args = Flags(out=str(tmp_path / "runs" / "x.npz"))
    assert ended(raising(KeyboardInterrupt()), args) == "interrupted before the first checkpoint; nothing was saved"
    path = empo_io.checkpoint_path(args.out)
    assert path == str(tmp_path / "runs" / "x.checkpoint.npz")  # beside the output, named after it
    empo_io.save_checkpoint(path, {"w": np.zeros(2, np.float32)}, 1, "s", {})
    assert ended(raising(KeyboardInterrupt()), args) == (
        f"interrupted: progress is saved in {path}; run the same command with --resume to continue")


SWALLOWING_MAIN = """
import sys, time
sys.path.insert(0, {root!r})
import empo_io

class Args:
    out = {out!r}

def main(args):
    while True:
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:  # swallowed, as an exception raised inside JAX's gc callback is
            pass

empo_io.run(main, Args())
"""


def signalled(command: list, ready, signum=signal.SIGINT, timeout: float = 60.0, sigint=signal.SIG_DFL) -> tuple:
    """Start ``command`` (SIGINT set to ``sigint``: pytest may run as a background job, which ignores it), send
    ``signum`` once ``ready(process)`` is true, return (exit status, stderr lines)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        while not ready(process):
            assert process.poll() is None, process.stderr.read()
        process.send_signal(signum)
        _, err = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_whose_interrupt_is_swallowed_still_ends_the_run_in_one_sentence(tmp_path, signum):
    """The KeyboardInterrupt never reaches run(); the process still leaves, after the grace period, with the
    sentence and status 128 + the signal (before: it ran on)."""
    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWING_MAIN.format(root=str(ROOT), out=str(tmp_path / "x.npz")))
    status, err = signalled([sys.executable, str(script)], lambda p: p.stdout.readline() == "ready\n", signum,
                            timeout=empo_io.SIGNAL_GRACE_S + 20)
    assert status == 128 + signum
    assert err == ["interrupted before the first checkpoint; nothing was saved"]


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    """A job a shell script starts in the background ignores Ctrl-C (the terminal's is for the script)."""
    script = tmp_path / "swallow.py"
    script.write_text(SWALLOWING_MAIN.format(root=str(ROOT), out=str(tmp_path / "x.npz")))
    with pytest.raises(subprocess.TimeoutExpired):
        signalled([sys.executable, str(script)], lambda p: p.stdout.readline() == "ready\n",
                  timeout=empo_io.SIGNAL_GRACE_S + 2, sigint=signal.SIG_IGN)


def test_ctrl_c_while_the_libraries_load_is_one_sentence(tmp_path):
    """Ctrl-C while nav_env.py imports JAX (before run() is called): one sentence, status 130 (before: a traceback
    from inside an import, or an interrupt swallowed and the run going on)."""
    def loading_jax(process) -> bool:
        try:
            return "jaxlib" in Path(f"/proc/{process.pid}/maps").read_text()
        except OSError:
            pytest.skip("needs /proc to see when the process loads JAX")

    status, err = signalled([sys.executable, "nav_env.py", "--out", str(tmp_path / "d.npz")], loading_jax)
    assert status == 130 and err == ["interrupted while starting; nothing was saved"]
    assert not (tmp_path / "d.npz").exists()


def test_run_puts_back_the_signal_handlers_it_found(no_host_devices):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ended(raising(KeyboardInterrupt()), Flags())
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ----------------------------------------------------------------------------------------------
# Checkpoints: a checkpoint belongs to one run
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunFlags:
    out: str = "x.npz"
    dataset: str = "d.npz"
    resume: bool = True
    log_every: int = 10
    seed: int = 0
    learning_rate: float = 3e-4
    hidden: tuple = (8, 8)


NEUTRAL = ("out", "dataset", "resume", "log_every")
CKPT = "empo/test-checkpoint/v1"


def test_a_checkpoint_edited_to_hold_nan_is_refused_on_resume_with_how_to_start_over(tmp_path):
    """Before: the run resumed from it and ended in "did the run diverge?"."""
    args = RunFlags(out=str(tmp_path / "x.npz"))
    identity = empo_io.run_identity(args, NEUTRAL, {"dataset": "ab" * 32})
    template = {"w": np.zeros((2, 3), np.float32), "step": np.int32(0)}
    path = empo_io.checkpoint_path(args.out)
    empo_io.save_checkpoint(path, {"w": np.ones((2, 3), np.float32), "step": np.int32(7)}, 4, CKPT, identity)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["leaf_0001"][1, 2] = np.nan  # the leaves in tree order: step, w
    np.savez(path, **arrays)
    message = refused(r"holds NaN or infinite values \('leaf_0001'\), which a run never saves: the file was changed "
                      r"or damaged; delete it and run without --resume to start over",
                      empo_io.resume_checkpoint, args, template, CKPT, identity, 9)
    assert message.startswith(path)


def test_run_identity_keeps_the_output_the_inputs_and_every_flag_that_changes_the_result(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    identity = empo_io.run_identity(RunFlags(out="runs/x.npz"), NEUTRAL, {"dataset": "ab" * 32})
    assert identity == {"out": str(tmp_path / "runs" / "x.npz"), "inputs": {"dataset": "ab" * 32},
                        "flags": {"seed": 0, "learning_rate": 3e-4, "hidden": [8, 8]}}  # as JSON gives it back


def test_the_output_replaces_the_checkpoint_only_once_it_is_written(tmp_path):
    """save_output writes args.out with the run's flags and removes the checkpoint beside it; a refused write (NaN)
    leaves the checkpoint, so that --resume still has the run's work."""
    args = dataclasses.make_dataclass("Args", [("out", str)])(str(tmp_path / "run.npz"))
    ckpt = empo_io.checkpoint_path(args.out)
    empo_io.save_checkpoint(ckpt, {"x": np.zeros(2, np.float32)}, 3, "test/checkpoint/v1", {})
    with pytest.raises(empo_io.InputError, match="NaN"):
        empo_io.save_output(args, {"x": np.array([np.nan], np.float32)}, "test/v1", {})
    assert os.path.exists(ckpt) and not os.path.exists(args.out)
    empo_io.save_output(args, {"x": np.ones(2, np.float32)}, "test/v1", {"dataset": "abc"})
    out = empo_io.load_npz(args.out, "test/v1")
    assert out["x"].tolist() == [1.0, 1.0] and json.loads(str(out["inputs"])) == {"dataset": "abc"}
    assert json.loads(str(out["args"])) == {"out": args.out} and not os.path.exists(ckpt)


def test_a_checkpoint_resumes_its_own_run_and_refuses_another_in_one_sentence(tmp_path, capsys):
    args = RunFlags(out=str(tmp_path / "x.npz"))
    identity = lambda a, digest="ab" * 32: empo_io.run_identity(a, NEUTRAL, {"dataset": digest})
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
    template = {"w": np.zeros((2, 3), np.float32), "step": np.int32(0)}
    path = empo_io.checkpoint_path(args.out)
    got_path, got, unit = empo_io.resume_checkpoint(args, template, CKPT, identity(args), 9)
    assert (got_path, got, unit) == (path, template, 0) and got is template  # no checkpoint yet
    empo_io.save_checkpoint(path, state, 4, CKPT, identity(args))
    before = Path(path).read_bytes()
    off = dataclasses.replace(args, resume=False)
    got_path, got, unit = empo_io.resume_checkpoint(off, template, CKPT, identity(off), 9)
    assert got is template and unit == 0  # without --resume
    # This run, also with other neutral flags and its data set moved (the same digest), resumes where it stopped.
    for same in (args, dataclasses.replace(args, log_every=1, dataset="moved/d.npz")):
        got_path, got, unit = empo_io.resume_checkpoint(same, template, CKPT, identity(same), 9)
        assert (got_path, unit) == (path, 4) and f"resumed from {path} at unit 4/9" in capsys.readouterr().out
        assert got["w"].dtype == np.float32 and got["step"].dtype == np.int32
        np.testing.assert_array_equal(got["w"], state["w"])
        assert int(got["step"]) == 7
    # Another run: one sentence naming the first difference.
    other_out = tmp_path / "y.npz"
    Path(empo_io.checkpoint_path(str(other_out))).write_bytes(before)  # a checkpoint copied beside another output
    moved = dataclasses.replace(args, out=str(other_out))
    lr = "flags.learning_rate is 0.0003 there, 0.001 here"
    cases = [(dataclasses.replace(args, learning_rate=1e-3), "ab" * 32, lr),
             (dataclasses.replace(args, learning_rate=1e-3, seed=1), "ab" * 32, lr),  # the first difference
             (dataclasses.replace(args, hidden=(8, 16)), "ab" * 32, r"flags.hidden is \[8, 8\] there, \[8, 16\] here"),
             (args, "cd" * 32, r"inputs.dataset is abababababab... there, cdcdcdcdcdcd... here"),
             (moved, "ab" * 32, r"out is .*\.\.\. there, .*\.\.\. here")]
    for run, digest, difference in cases:
        ckpt = empo_io.checkpoint_path(run.out)
        refused(f"{ckpt} belongs to another run \\({difference}\\); delete it or drop --resume",
                empo_io.resume_checkpoint, run, template, CKPT, identity(run, digest), 9)
    refused(f"{path} was written by a run with other sizes; delete it or drop --resume", empo_io.resume_checkpoint,
            args, {"w": np.zeros((2, 4), np.float32), "step": np.int32(0)}, CKPT, identity(args), 9)
    refused(f"{path} was written by a run with other sizes", empo_io.resume_checkpoint,
            args, {**template, "extra": np.zeros(1)}, CKPT, identity(args), 9)
    refused(f"{path} records 4 finished units, but this run's schedule has 3; delete it or drop --resume",
            empo_io.resume_checkpoint, args, template, CKPT, identity(args), 3)
    assert Path(path).read_bytes() == before  # a refusal leaves the checkpoint as it was


# ----------------------------------------------------------------------------------------------
# Progress, parameters, devices, presets
# ----------------------------------------------------------------------------------------------

def test_progress_estimates_each_kind_of_unit_by_its_own_mean_time(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(empo_io, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    progress = empo_io.Progress(5, "stage", kinds=["fast", "slow", "fast", "slow", "slow"])

    def call(t, done, **fields):
        now[0] = 100.0 + t
        progress(done, **fields)
        return capsys.readouterr().out.strip()

    # 1 fast unit in 2 s; the slow units, unseen yet, are estimated by every finished unit
    assert call(2, 1, loss=0.123456) == "[stage] 1/5 (20%) elapsed 2s, left ~8s loss=0.1235"
    assert call(22, 2, epoch=3) == "[stage] 2/5 (40%) elapsed 22s, left ~42s epoch=3"  # 2 + 20 + 20 s left
    assert call(26, 4) == "[stage] 4/5 (80%) elapsed 26s, left ~11s"  # slow units took 20 s and 2 s
    resumed = empo_io.Progress(5, "stage", kinds=["fast", "slow", "fast", "slow", "slow"], first=3)
    now[0] = 300.0
    resumed(4)  # 174 s for unit 4 alone: the units finished before the resume are not timed
    assert capsys.readouterr().out.strip() == "[stage] 4/5 (80%) elapsed 174s, left ~174s"


def test_parameters_flatten_to_slash_keys_and_back():
    params = {"params": {"Dense_0": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
                         "Dense_1": {"kernel": np.full((3, 1), 2.0, np.float32)}}}
    flat = empo_io.flatten_params("policy", params)
    assert sorted(flat) == ["policy/params/Dense_0/bias", "policy/params/Dense_0/kernel",
                            "policy/params/Dense_1/kernel"]
    other = {"policyx/params/w": np.zeros(1), "classifier/params/w": np.zeros(1)}  # other prefixes are left out
    back = empo_io.unflatten_params("policy", {**flat, **other})
    assert back.keys() == params.keys() and back["params"].keys() == params["params"].keys()
    for layer, leaves in params["params"].items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(np.asarray(back["params"][layer][name]), value)


def test_seeds_are_sharded_over_as_many_devices_as_evenly_divide_them():
    script = textwrap.dedent("""
        import jax, numpy as np
        from empo_io import seed_shardings
        assert len(jax.devices()) == 4
        for seeds in range(1, 7):
            per_seed, replicated = seed_shardings(seeds)
            x = jax.device_put(np.zeros((seeds, 2), np.float32), per_seed)
            y = jax.device_put(np.zeros(3, np.float32), replicated)
            print(seeds, len(per_seed.mesh.devices), len(x.addressable_shards), x.addressable_shards[0].data.shape[0],
                  y.sharding.is_fully_replicated)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    devices = {1: 1, 2: 2, 3: 3, 4: 4, 5: 1, 6: 3}  # the most devices (of 4) that divide the seeds evenly
    assert rows == [[str(s), str(d), str(d), str(s // d), "True"] for s, d in devices.items()]


@dataclasses.dataclass
class Preset:
    """A tiny script with two presets."""

    preset: str = "small"
    """the preset"""
    hidden: int = 8
    """hidden units"""
    lr: float = 0.1
    """the learning rate"""


PRESETS = {"small": Preset(), "big": Preset(preset="big", hidden=64, lr=0.01)}


@pytest.mark.parametrize("argv, want", [
    ([], Preset()),
    (["--preset", "big"], PRESETS["big"]),
    (["--preset", "big", "--hidden", "5"], Preset(preset="big", hidden=5, lr=0.01)),
    (["--hidden", "5", "--preset", "big"], Preset(preset="big", hidden=5, lr=0.01)),  # a flag wins wherever it is
])
def test_cli_parses_every_flag_over_the_defaults_of_its_preset(monkeypatch, argv, want):
    monkeypatch.setattr(sys, "argv", ["tiny.py", *argv])
    assert empo_io.cli(Preset, PRESETS) == want


def test_cli_help_shows_the_defaults_of_the_preset(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["tiny.py", "--preset", "big", "--help"])
    with pytest.raises(SystemExit):
        empo_io.cli(Preset, PRESETS)
    text = capsys.readouterr().out
    assert "(default: 64)" in text and "(default: 0.01)" in text and "(default: 8)" not in text


def test_a_run_over_several_processes_is_started_only_where_the_environment_names_one(monkeypatch):
    """JAX's multi-process runtime starts for JAX_COORDINATOR_ADDRESS (with a count and an index), an srun step of
    several tasks or an mpirun of several ranks; not in one process, nor in a batch script of a multi-task SLURM
    job (no srun step: no peer would come); a half-named run is one sentence."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NUM_TASKS",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # sbatch's environment, outside srun
    empo_io.start_processes()
    assert calls == []
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    empo_io.start_processes()
    assert calls == [((), {})]  # JAX reads SLURM's variables itself
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    with pytest.raises(empo_io.InputError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set"):
        empo_io.start_processes()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(empo_io.InputError, match=r"JAX_PROCESS_ID 2 must be in 0..1"):
        empo_io.start_processes()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    empo_io.start_processes()
    assert calls[-1] == (("node0:1234",), {"num_processes": 2, "process_id": 1})
