"""What every script does that is not the algorithm: the .npz handoffs, data-set loading, checkpoints, the command line.

Each stage file holds its algorithm whole and imports what it needs from here by name; a reader auditing an
equation never needs this file, a reader copying a stage copies it and this one. The promises kept here, once for
every script (tests/test_empo_io.py checks each):

1. Handoffs (``save_npz`` / ``load_npz`` / ``check_arrays``): arrays only, read without pickles; metadata as 0-d
   strings (schema, args JSON, producer, inputs' sha256); written to a temporary file beside the target and
   renamed over it only when complete, so a crash or a full disk leaves an earlier file as it was; NaN or
   infinite arrays are never written; an output that is one of the run's inputs is refused before any work.
   Figures (``save_figure``) are written whole or not at all; a write error of the TensorBoard events
   (``make_writer``) ends the run in one sentence when the writer is closed, not in a thread's traceback.
2. Data sets (``load_dataset``): an .npz (schema empo/dataset/v1), D4RL v2 HDF5 files or Minari ids from the
   local store, validated (keys, dtypes, shapes, finiteness, trajectory structure); never downloaded.
3. Checkpoints (``resume_checkpoint`` / ``save_checkpoint``): beside the output and named after it; a checkpoint
   records the run it belongs to (output path, inputs' sha256, every flag that changes the result) and
   ``--resume`` refuses one of another run in one sentence.
4. The command line (``cli`` / ``run``): tyro flags over a preset (a column of Table 4); bad input, a full memory
   end in one ``error: ...`` sentence (``InputError``), not a traceback; Ctrl-C and SIGTERM at any instant (even
   while the libraries load, inside a callback that swallows the interrupt, or during an XLA compile) end in one
   sentence and status 128 + the signal, leaving without the interpreter's finalisation, which races XLA's
   threads; one XLA host device per core.
"""

from __future__ import annotations

import os
import signal
import sys

# The scripts that import this module first, so that Ctrl-C while the libraries load is one sentence (guard_start_up).
SCRIPTS = ("nav_env.py", "empo_cluster.py", "empo_ppo.py", "empo_highlevel.py", "bc.py", "td3_bc.py", "iql.py",
           "sac.py")


def guard_start_up() -> None:
    """Ctrl-C or SIGTERM while the libraries load, before ``run`` takes over: one sentence and status 128 + the
    signal, no traceback (a signal that whoever started the script ignores stays ignored)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda n, _: (os.write(2, b"interrupted while starting; nothing was saved\n"),
                                                os._exit(128 + n)))


if os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "") in SCRIPTS:
    guard_start_up()  # before the libraries below: a script run as a command imports this module first

# isort: split

import contextlib
import hashlib
import io
import json
import math
import re
import select
import socket
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import traverse_util

# ----------------------------------------------------------------------------------------------
# The .npz handoffs
# ----------------------------------------------------------------------------------------------

class InputError(ValueError):
    """Bad input or output: the message is one sentence that names the file and the problem."""


def same_file(a: str, b: str) -> bool:
    """True when two paths name one file: equal after resolving links, or hard links to the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: str, inputs=()) -> None:
    """Fail before any work if ``path`` cannot be written or is one of ``inputs`` (paths or comma-joined paths):
    an output never replaces an input."""
    if not os.path.basename(path or ""):
        raise InputError(f"the output path '{path}' names no file")
    if os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder")
    for source in inputs:
        for part in {source, *source.split(",")}:
            if part and same_file(path, part):
                raise InputError(f"refusing to write {path}: it is the input {part}, which would be lost")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {path}: its folder {folder} cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def save_npz(path: str, arrays: dict, schema: str, args, inputs: Optional[dict] = None) -> None:
    """Write arrays and metadata (schema, args JSON, producer, inputs' sha256) atomically.

    The file is written beside ``path`` under a temporary name (with the writer's pid, so that one left by a
    killed writer is removed by the next) and renamed over ``path`` only when complete, with the permissions the
    umask gives. Arrays with NaN or infinite values are refused; on any failure an earlier file stays as it was.
    """
    for key, a in arrays.items():
        if np.asarray(a).dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{path} was not written: '{key}' contains NaN or infinite values (did the run "
                             f"diverge?); an earlier file there is left as it was")
    check_writable(path)
    meta = dict(schema=np.array(schema), args=np.array(json.dumps(args, default=str, sort_keys=True)),
                producer=np.array(os.path.basename(sys.argv[0]) or "python"),
                inputs=np.array(json.dumps(inputs or {}, sort_keys=True)))
    write_atomically(path, lambda f: np.savez(f, **arrays, **meta), "an earlier file there is left as it was")


def write_atomically(path: str, write, kept: str) -> None:
    """``write(file)`` into a temporary file beside ``path`` (named with the writer's pid, so that one left by a
    killed writer is removed by the next), renamed over ``path`` only when complete, with the permissions the umask
    gives. An OSError (a full disk) removes the temporary file and becomes one sentence that ends with ``kept``.
    In a run over several processes, only process 0 writes (``writes_files``)."""
    if not writes_files():
        return
    folder, name = os.path.split(os.path.abspath(path))
    for old in os.listdir(folder):  # temporaries of this file left by writers that no longer run
        pid = old[len(name) + 2:].split(".")[0]
        if old.startswith(f".{name}.") and old.endswith(".tmp") and pid.isdigit() and not _pid_alive(int(pid)):
            os.remove(os.path.join(folder, old))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write {path}: {e.strerror or e}; {kept}") from None
        raise


def save_figure(fig, path: str) -> None:
    """A matplotlib figure written whole or not at all (``write_atomically``), in the format its suffix names: a
    full disk leaves no partial image, in one sentence."""
    check_writable(path)
    image_format = os.path.splitext(path)[1][1:].lower() or "png"
    write_atomically(path, lambda f: fig.savefig(f, format=image_format), "no partial image was left")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def load_npz(path: str, schema, digest: bool = False):
    """Read a handoff file (no pickles) and check its schema (one, or a tuple of those accepted): a dict of NumPy
    arrays, or with ``digest`` the pair (arrays, sha256 of the bytes that were read), so that provenance names the
    file as it was used."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an .npz file")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError:  # numpy takes what is neither .npz nor .npy for pickled data
        raise InputError(f"{path} is not an .npz file") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npz file ({e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds a single array (.npy), not an .npz file")
    try:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise InputError(f"{path} is not a readable .npz file ({e})") from None
    found, accepted = str(arrays.get("schema", "none")), (schema,) if isinstance(schema, str) else tuple(schema)
    if found not in accepted:
        expected = "' or '".join(accepted)
        raise InputError(f"{path} has schema '{found}', expected '{expected}'")
    return (arrays, hashlib.sha256(raw).hexdigest()) if digest else arrays


def check_arrays(name: str, arrays: dict, spec: dict, sizes: Optional[dict] = None) -> dict:
    """Check keys, dtypes and symbolic shapes, e.g. {"actions": ("float32", ("N", "act_dim"))}.

    Symbols are bound on first sight (or taken from ``sizes``) and must agree everywhere; floating
    arrays must be finite. Returns the bound sizes. Raises InputError naming the file and the key.
    """
    sizes = dict(sizes or {})
    for key, (dtype, shape) in spec.items():
        if key not in arrays:
            raise InputError(f"{name} has no key '{key}'")
        a = arrays[key]
        if a.dtype != np.dtype(dtype):
            raise InputError(f"{name}: '{key}' has dtype {a.dtype}, expected {dtype}")
        if a.ndim != len(shape):
            raise InputError(f"{name}: '{key}' has shape {a.shape}, expected {len(shape)} dimensions {shape}")
        for dim, want in zip(a.shape, shape):
            want = sizes.setdefault(want, dim) if isinstance(want, str) else want
            if dim != want:
                raise InputError(f"{name}: '{key}' has shape {a.shape}, expected {shape} with {sizes}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{name}: '{key}' contains NaN or infinite values")
    return sizes


def made_from(arrays: dict, name: str):
    """The sha256 recorded under ``name`` in a file's inputs JSON (None when absent or unreadable)."""
    try:
        return json.loads(str(arrays["inputs"])).get(name)
    except (KeyError, ValueError, AttributeError):
        return None


def check_made_from(path: str, arrays: dict, data_sha: str) -> None:
    """A stage's output was made from the data set of sha256 ``data_sha`` (as its inputs JSON records)."""
    found = made_from(arrays, "dataset")
    if found != data_sha:
        raise InputError(f"{path} was made from another data set (sha256 {str(found)[:12]}..., this one is "
                         f"{data_sha[:12]}...)")


def check_arch(name: str, arrays: dict) -> None:
    """The arch/* entries of a handoff file rebuild a network: sizes at least 1, scales positive."""
    for key in ("arch/k", "arch/hidden_dim", "arch/hidden_layers"):
        if key in arrays and int(arrays[key]) < 1:
            raise InputError(f"{name}: '{key}' must be at least 1, got {int(arrays[key])}")
    for key in ("arch/obs_std", "arch/action_scale", "arch/value_scale"):
        if key in arrays and not np.all(arrays[key] > 0):
            raise InputError(f"{name}: '{key}' must be positive, got {arrays[key]}")


def param_shapes(net, in_dim: int):
    """The parameters of ``net`` on inputs of ``in_dim`` features, as shapes only (nothing is computed)."""
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, in_dim), jnp.float32))["params"]


def check_param_shapes(name: str, arrays: dict, prefix: str, template, lead: int) -> None:
    """The parameters under ``prefix`` have, after ``lead`` leading axes (seeds, clusters), the shapes of
    ``template`` (one network built from the file's arch/* entries)."""
    want = {f"{prefix}/{k}": tuple(v.shape) for k, v in traverse_util.flatten_dict(template, sep="/").items()}
    have = {k: a.shape[lead:] for k, a in arrays.items() if k.startswith(prefix + "/")}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise InputError(f"{name} has no key '{key}', which its arch/* entries call for")
        if key not in want or have[key] != want[key]:
            raise InputError(f"{name}: '{key}' has shape {have[key]} per run, but its arch/* entries give "
                             f"{want.get(key, 'no such parameter')}")

def load_cluster(path: str, data_sha: str, data_sizes: dict, networks) -> tuple[dict, dict, str]:
    """Read and validate a stage-1 output (schema empo/cluster/v1) against the data set (sizes N, E, obs_dim,
    act_dim): keys, dtypes, shapes, arch/*, the parameters' shapes against ``networks(hidden_dim, hidden_layers, K)``
    -> {"policy/params": net, "classifier/params": net} and the data set it was made from. Returns (arrays, sizes
    with S and K, sha256 of the file as read)."""
    arrays, digest = load_npz(path, "empo/cluster/v1", digest=True)
    spec = {"posterior": ("float32", ("S", "E", "K")), "assignments": ("int32", ("S", "N")),
            "arch/k": ("int64", ()), "arch/hidden_dim": ("int64", ()), "arch/hidden_layers": ("int64", ()),
            "arch/obs_mean": ("float32", ("obs_dim",)), "arch/obs_std": ("float32", ("obs_dim",)),
            "arch/action_scale": ("float32", ("act_dim",))}
    if not any(key.startswith("policy/params/") for key in arrays):
        raise InputError(f"{path} has no key 'policy/params/...'")
    sizes = check_arrays(path, arrays, spec, data_sizes)
    check_arch(path, arrays)
    if int(arrays["arch/k"]) != sizes["K"]:
        raise InputError(f"{path}: 'arch/k' is {int(arrays['arch/k'])} but its arrays hold K={sizes['K']} clusters")
    nets = networks(int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"]), sizes["K"])
    check_param_shapes(path, arrays, "policy/params", param_shapes(nets["policy/params"], sizes["obs_dim"]), 2)
    if any(key.startswith("classifier/params/") for key in arrays):  # stage 3 reads it
        check_param_shapes(path, arrays, "classifier/params", param_shapes(nets["classifier/params"],
                                                                           sizes["obs_dim"]), 1)
    check_arrays(path, arrays, {key: ("float32", ("S", "K") + a.shape[2:] if key.startswith("policy/") else ("S",)
                                      + a.shape[1:]) for key, a in arrays.items() if "/params/" in key}, sizes)
    if arrays["assignments"].min() < 0 or arrays["assignments"].max() >= sizes["K"]:
        raise InputError(f"{path}: 'assignments' holds cluster numbers outside 0..{sizes['K'] - 1}")
    check_made_from(path, arrays, data_sha)
    return arrays, sizes, digest


# ----------------------------------------------------------------------------------------------
# Data sets: .npz, D4RL HDF5 files, Minari ids
# ----------------------------------------------------------------------------------------------

DATASET_SCHEMA = "empo/dataset/v1"
DATASET_SPEC = {
    "observations": ("float32", ("N", "obs_dim")),
    "actions": ("float32", ("N", "act_dim")),
    "rewards": ("float32", ("N",)),
    "next_observations": ("float32", ("N", "obs_dim")),
    "terminals": ("bool", ("N",)),
    "timeouts": ("bool", ("N",)),
    "episode_ids": ("int32", ("N",)),
    "behaviour": ("int32", ("N",)),
}


def load_dataset(source: str) -> tuple[dict, str]:
    """Load a data set from an ``.npz`` path, D4RL HDF5 files or Minari ids (both comma-separated); validate it.

    D4RL files (``*.hdf5``, read with h5py) and Minari ids (read from the local store, ``MINARI_DATASETS_PATH``
    or ~/.minari) are never downloaded. Several files or ids are concatenated and labelled by their index, the
    way D4RL medium-expert is medium + expert; a single Minari id takes ``behaviour`` from each episode's
    metadata where present, a single D4RL file has none (-1). A ``source`` that exists as a whole is one file even
    when its name holds commas. Returns (arrays, sha256 of the arrays' bytes).
    """
    # a path that exists as a whole is one file, commas and all; otherwise commas separate files or ids
    parts = [source] if os.path.exists(source) else [s.strip() for s in source.split(",") if s.strip()]
    hdf5 = [p.endswith((".hdf5", ".h5")) for p in parts]
    if any(hdf5) and not all(hdf5):
        raise InputError(f"--dataset {source} mixes D4RL .hdf5 files with other sources; give one kind")
    if parts and all(hdf5):
        data = _load_d4rl_hdf5(parts)
    elif source.endswith(".npz") or os.path.exists(source):
        arrays = load_npz(source, DATASET_SCHEMA)
        data = {k: arrays[k] for k in DATASET_SPEC if k in arrays}
    elif parts and all(re.fullmatch(r"([\w-]+/)*[\w-]+-v\d+", p) for p in parts):
        data = _load_minari(parts)
    else:  # neither a file nor something shaped like Minari's namespace/name-vN
        raise InputError(f"--dataset {source}: no such file (a Minari id looks like 'namespace/name-v0')")
    validate_dataset(source, data)
    digest = hashlib.sha256()
    for key in DATASET_SPEC:
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    return data, digest.hexdigest()


# The largest magnitude a data set's observations, actions and rewards may hold. Real data sets stay far below it
# (D4RL's MuJoCo observations below 1e3, rewards per step below 1e2, actions in [-1, 1]); above it float32
# training overflows: a return over the 1000-step horizon of gamma = 0.999 is 1e3 times a reward, and the value
# losses square it, so 1e6 gives (1e9)^2 = 1e18, far below float32's 3.4e38, while 1e20 already overflows.
LARGEST_DATA_VALUE = 1e6


def validate_dataset(name: str, data: dict) -> dict:
    """Schema, shapes, finiteness, magnitudes (at most LARGEST_DATA_VALUE) and trajectory structure; returns the
    sizes (N, obs_dim, act_dim)."""
    sizes = check_arrays(name, data, DATASET_SPEC)
    ids = data["episode_ids"]
    if sizes["N"] == 0:
        raise InputError(f"{name} holds no transitions")
    for key, dim in (("observations", "obs_dim"), ("actions", "act_dim")):
        if sizes[dim] == 0:
            raise InputError(f"{name}: '{key}' has no features (shape {data[key].shape})")
    for key in ("observations", "next_observations", "actions", "rewards"):
        large = np.abs(data[key].reshape(len(data[key]), -1)).max(axis=1) > LARGEST_DATA_VALUE
        if large.any():
            row = int(np.flatnonzero(large)[0])
            value = data[key][row].flat[np.abs(data[key][row]).argmax()]
            raise InputError(f"{name}: '{key}' holds {value:.3g} at row {row}, beyond +-{LARGEST_DATA_VALUE:.0e}, "
                             f"where float32 training overflows; rescale the data set")
    steps = np.diff(ids)
    if ids[0] != 0 or np.any((steps != 0) & (steps != 1)):
        raise InputError(f"{name}: 'episode_ids' must start at 0 and count up by one, trajectories contiguous")
    last = np.r_[steps != 0, True]  # last row of each trajectory
    ends = data["terminals"] | data["timeouts"]
    if np.any(ends & ~last):
        raise InputError(f"{name}: a terminal or timeout flag stands inside a trajectory, not at its end")
    if np.any(last & ~ends):
        raise InputError(f"{name}: a trajectory ends with neither a terminal nor a timeout flag")
    if np.any(data["terminals"] & data["timeouts"]):
        raise InputError(f"{name}: a trajectory ends with both a terminal and a timeout flag (exactly one is allowed)")
    return sizes


def _load_minari(ids: list) -> dict:
    if not ids:
        raise InputError("no Minari data set id was given")
    parts, first_episode = [], 0
    for index, dataset_id in enumerate(ids):
        dataset = open_minari(dataset_id)
        meta = list(dataset.storage.get_episode_metadata(dataset.episode_indices)) if len(ids) == 1 else None
        for j, ep in enumerate(dataset.iterate_episodes()):
            if isinstance(ep.observations, dict) or isinstance(ep.actions, dict):
                raise InputError(f"Minari data set '{dataset_id}' has dictionary observations or actions")
            n = len(ep.rewards)
            obs = np.asarray(ep.observations, np.float32).reshape(n + 1, -1)
            term = np.asarray(ep.terminations, bool)
            label = index if meta is None else int(meta[j].get("behaviour", -1))
            parts.append(dict(
                observations=obs[:-1], actions=np.asarray(ep.actions, np.float32).reshape(n, -1),
                rewards=np.asarray(ep.rewards, np.float32), next_observations=obs[1:], terminals=term,
                # a trajectory that stops without a terminal is a timeout, whatever the flags say; a terminal never is
                timeouts=(np.asarray(ep.truncations, bool) | (np.arange(n) == n - 1)) & ~term,
                episode_ids=np.full(n, first_episode, np.int32), behaviour=np.full(n, label, np.int32)))
            first_episode += 1
    if not parts:
        raise InputError(f"Minari data sets {ids} hold no episodes")
    return {k: np.concatenate([p[k] for p in parts]) for k in DATASET_SPEC}


def open_minari(dataset_id: str):
    """``minari.load_dataset(dataset_id, download=False)`` with one-sentence errors."""
    import minari

    try:
        return minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        raise InputError(f"Minari data set '{dataset_id}' is not stored locally; download it with "
                         f"`minari download {dataset_id}` (local store: MINARI_DATASETS_PATH or ~/.minari)") from None
    except Exception as e:  # a damaged local copy: say which
        raise InputError(f"Minari data set '{dataset_id}' could not be read ({e})") from None


def check_minari_id(dataset_id: str) -> None:
    """A new local Minari id: well formed ``(namespace/)name-vN`` and not taken in the local store."""
    from minari.dataset.minari_dataset import DATASET_ID_RE

    match = DATASET_ID_RE.fullmatch(dataset_id)
    if not match or match.group("version") is None:
        raise InputError(f"--minari-id '{dataset_id}' is not a Minari id of the form (namespace/)name-vN")
    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    if os.path.exists(os.path.join(store, dataset_id)):
        raise InputError(f"Minari data set '{dataset_id}' already exists in the local store ({store}); choose "
                         f"another id or delete it")


D4RL_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def _load_d4rl_hdf5(paths: list) -> dict:
    """D4RL HDF5 files concatenated, each file's index its ``behaviour`` label (-1 when there is one file).

    Each file is cut into trajectories after every row flagged ``terminals`` or ``timeouts``; rows after the
    last flag (D4RL cuts files at a row count) are one more trajectory, ended as a timeout. Other keys
    (``infos/*``, ``metadata/*``) are ignored. Both flags on one row is an error, as are a missing key,
    sizes that disagree, NaN and flags other than 0 / 1: one sentence naming the file, the key and the row.
    """
    parts, first_episode = [], 0
    for index, path in enumerate(paths):
        arrays = _read_d4rl_file(path)
        if parts and arrays["observations"].shape[1:] != parts[0]["observations"].shape[1:]:
            raise InputError(f"{path} has {arrays['observations'].shape[1]}-dim observations, {paths[0]} has "
                             f"{parts[0]['observations'].shape[1]}: files of different tasks")
        if parts and arrays["actions"].shape[1:] != parts[0]["actions"].shape[1:]:
            raise InputError(f"{path} has {arrays['actions'].shape[1]}-dim actions, {paths[0]} has "
                             f"{parts[0]['actions'].shape[1]}: files of different tasks")
        n, term = len(arrays["rewards"]), arrays["terminals"]
        both = np.flatnonzero(term & arrays["timeouts"])
        if both.size:
            raise InputError(f"{path}: row {both[0]} has both 'terminals' and 'timeouts' set; a trajectory ends "
                             f"with one of them")
        arrays["timeouts"][-1] |= ~term[-1]  # the last trajectory stops with the file: a timeout
        ends = term | arrays["timeouts"]
        arrays["episode_ids"] = (first_episode + np.r_[0, np.cumsum(ends[:-1])]).astype(np.int32)
        arrays["behaviour"] = np.full(n, index if len(paths) > 1 else -1, np.int32)
        first_episode = int(arrays["episode_ids"][-1]) + 1
        parts.append(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in DATASET_SPEC}


def _read_d4rl_file(path: str) -> dict:
    """The six D4RL keys of one HDF5 file as float32 [N, ...] / bool [N] arrays, checked."""
    import h5py

    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a D4RL HDF5 file")
    if not os.path.isfile(path):
        name = os.path.basename(path)
        url = ("; D4RL's copy: http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/" + name
               if name.endswith("-v2.hdf5") and name.split("_")[0] in ("halfcheetah", "hopper", "walker2d", "ant")
               else "")
        raise InputError(f"{path} does not exist{url}")
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            for key in D4RL_KEYS:
                if not isinstance(f.get(key), h5py.Dataset):
                    raise InputError(f"{path} has no key '{key}' (a D4RL v2 file has {', '.join(D4RL_KEYS)})")
                arrays[key] = np.asarray(f[key][()])
    except OSError as e:
        raise InputError(f"{path} is not a readable HDF5 file ({e})") from None
    n = len(arrays["observations"]) if arrays["observations"].ndim else 0
    if n == 0:
        raise InputError(f"{path} holds no transitions")
    for key, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise InputError(f"{path}: '{key}' has dtype {a.dtype}, expected numbers")
        if key in ("rewards", "terminals", "timeouts") and a.ndim == 2 and a.shape[1] == 1:
            a = arrays[key] = a[:, 0]  # [N, 1] -> [N]
        want = 1 if key in ("rewards", "terminals", "timeouts") else 2
        if a.ndim != want or len(a) != n:
            raise InputError(f"{path}: '{key}' has shape {a.shape}, expected {[n] if want == 1 else [n, 'dim']} "
                             f"('observations' has {n} rows)")
        if key in ("terminals", "timeouts"):
            bad = np.flatnonzero((a != 0) & (a != 1))
            if bad.size:
                raise InputError(f"{path}: '{key}' is {a[bad[0]]} at row {bad[0]}, expected 0 or 1")
            arrays[key] = a.astype(bool)
        else:
            arrays[key] = a = a.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(axis=1))
            if bad.size:
                raise InputError(f"{path}: '{key}' contains NaN or infinite values (row {bad[0]})")
    if arrays["next_observations"].shape != arrays["observations"].shape:
        raise InputError(f"{path}: 'next_observations' has shape {arrays['next_observations'].shape}, "
                         f"'observations' {arrays['observations'].shape}")
    return arrays


def observation_stats(name: str, observations):
    """(mean, std + 1e-3) per observation dimension, computed in float64 and checked to fit float32."""
    x = np.asarray(observations, np.float64)
    mean, std = x.mean(0).astype(np.float32), (x.std(0) + 1e-3).astype(np.float32)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise InputError(f"{name}: 'observations' are too large to standardise in float32 (largest |value| "
                         f"{np.abs(x).max():.3g})")
    return mean, std


# ----------------------------------------------------------------------------------------------
# The command line: flags, errors, progress, TensorBoard, devices
# ----------------------------------------------------------------------------------------------

def make_writer(log_dir: str, args):
    """A tensorboardX writer with the hyperparameters logged as a text table.

    tensorboardX writes its event file in a thread of its own, where a write error (a full disk) only prints a
    traceback, and the thread's death then blocks the run at its next ten events; here the error is kept, later
    events are dropped, and the writer's ``close`` raises it as one sentence (the events written before it stay in
    the file: TensorBoard reads a log up to its last whole record)."""
    from tensorboardX import SummaryWriter

    if not writes_files():
        return _NoWriter()
    try:
        writer = SummaryWriter(log_dir)
        events = writer._get_file_writer().event_writer._ev_writer  # tensorboardX 2.6: the file the thread writes
    except OSError as e:
        raise InputError(f"cannot write the TensorBoard events in {log_dir}: {e.strerror or e}") from None
    records = events._py_recordio_writer = _KeptErrors(events._py_recordio_writer)
    close = writer.close

    def close_and_check() -> None:
        close()
        if records.error is not None:
            raise InputError(f"cannot write the TensorBoard events {events._file_name}: "
                             f"{records.error.strerror or records.error}; the events before the error are kept")

    writer.close = close_and_check
    rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(asdict(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + rows)
    return writer


class _NoWriter:
    """The TensorBoard writer of a process other than 0 in a run over several processes: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _KeptErrors:
    """tensorboardX's record file whose first OSError is kept (``error``) instead of raised; later writes are
    dropped, and the file is still closed."""

    def __init__(self, records):
        self.records, self.error = records, None

    def write(self, data) -> None:
        self._call(self.records.write, data)

    def flush(self) -> None:
        self._call(self.records.flush)

    def close(self) -> None:
        try:
            self.records.close()
        except OSError as e:
            self.error = self.error or e

    def _call(self, method, *args) -> None:
        if self.error is None:
            try:
                method(*args)
            except OSError as e:
                self.error = e


def seed_shardings(num_seeds: int):
    """(per-seed sharding, replicated sharding) over as many devices as evenly divide num_seeds. In a run over P
    processes (``start_processes``) the devices are taken evenly from every process, so the count is a multiple of
    P, and --num-seeds must be one too."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    processes = jax.process_count()
    if num_seeds % processes:
        raise InputError(f"--num-seeds {num_seeds} cannot be shared evenly by the run's {processes} processes; "
                         f"give a multiple of {processes}")
    own = [[d for d in jax.devices() if d.process_index == p] for p in range(processes)]
    each = max(d for d in range(1, min(map(len, own)) + 1) if (num_seeds // processes) % d == 0)
    mesh = Mesh(np.array([d for devices in own for d in devices[:each]]), ("seeds",))
    return NamedSharding(mesh, PartitionSpec("seeds")), NamedSharding(mesh, PartitionSpec())


def start_processes() -> None:
    """JAX's multi-process runtime (``jax.distributed.initialize``) when the environment names a run over several
    processes, one per machine or per GPU: each process reads the inputs, the seeds are sharded over the devices of
    every process (``seed_shardings``), and process 0 alone writes outputs, checkpoints, figures and logs from
    arrays gathered across processes (``fetch``). Three ways to name the run:

    - ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=P JAX_PROCESS_ID=i`` (any launcher; the same address
      and P in every process, i = 0..P-1);
    - a SLURM job step of several tasks (``srun``; SLURM_STEP_NUM_TASKS > 1, which a batch script outside ``srun``
      does not set), or an Open MPI launch of several ranks (``mpirun``; OMPI_COMM_WORLD_SIZE > 1): JAX reads its
      cluster from the environment.
    One process (the default) starts nothing. The other processes print only errors (to stderr)."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise InputError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set "
                             "to whole numbers too (the run's processes and this one's index, from 0)") from None
        if not 0 <= index < count:
            raise InputError(f"JAX_PROCESS_ID {index} must be in 0..{count - 1} (JAX_NUM_PROCESSES is {count})")
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif any(os.environ.get(name, "1") not in ("", "0", "1") for name in ("SLURM_STEP_NUM_TASKS",
                                                                           "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()
    else:
        return  # (asking JAX for the process index here would start its backends before host_devices)
    if jax.process_index() != 0:  # process 0 prints the progress and what it wrote; the others only their errors
        sys.stdout = open(os.devnull, "w")


def writes_files() -> bool:
    """Whether this process writes the run's files: always in one process, process 0's alone in several."""
    return jax.process_index() == 0


def place(tree, sharding):
    """``jax.device_put(tree, sharding)``, also where the sharding spans the devices of other processes (a run over
    several processes): there every process holds the whole value and keeps the shards of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: their data
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        whole = fetch(x)
        return jax.make_array_from_callback(np.shape(whole), sharding, lambda index: whole[index])

    return jax.tree.map(one, tree)


def fetch(tree):
    """A pytree of (possibly sharded) arrays as NumPy arrays on the host, whole: ``jax.device_get`` where this process
    holds every shard, else gathered across the run's processes (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)  # one batched transfer of every leaf

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return jax.tree.map(whole, tree)


class Progress:
    """One status line per call: done/total, elapsed, estimated time left, and extra fields.

    kinds (one label per unit, optional) estimate each kind of unit by the mean time of the finished units
    of that kind (by all finished units until one is seen); first is the number of units finished before
    this process started (a resumed run), which the estimate leaves out. Hand-written because tqdm and rich
    estimate from one mean rate, which misses by hours when a SARSA call takes 1 s and a PPO epoch 80 s.
    """

    def __init__(self, total: int, name: str, kinds=None, first: int = 0):
        self.total, self.name, self.kinds = total, name, list(kinds) if kinds else [""] * total
        self.start = self.last = time.perf_counter()
        self.done, self.times = first, {}

    def __call__(self, done: int, **fields) -> None:
        now = time.perf_counter()
        for kind in self.kinds[self.done: done]:  # the time since the last call, shared by its units
            self.times.setdefault(kind, []).append((now - self.last) / max(done - self.done, 1))
        self.done, self.last = done, now
        every = [t for times in self.times.values() for t in times] or [0.0]
        left = sum(np.mean(self.times.get(kind, every)) for kind in self.kinds[done:])
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"[{self.name}] {done}/{self.total} ({100 * done / self.total:.0f}%) "
              f"elapsed {now - self.start:.0f}s, left ~{left:.0f}s {extra}", flush=True)


def flatten_params(prefix: str, params) -> dict:
    """{'prefix/Dense_0/kernel': array, ...} (flax.traverse_util, '/' separated)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {f"{prefix}/{k}": np.asarray(v) for k, v in flat.items()}


def unflatten_params(prefix: str, arrays: dict):
    flat = {k[len(prefix) + 1:]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(flat, sep="/")


def cli(args_class, presets: dict):
    """tyro's command line with the defaults of the ``--preset`` named on it (a column of the paper's Table 4).

    The preset is read first, then every flag is parsed against that preset's defaults, so ``--help`` shows
    them and a flag given on the command line always wins over its preset.
    """
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", choices=sorted(presets), default=next(iter(presets)))
    return tyro.cli(args_class, default=presets[parser.parse_known_args()[0].preset])


def check_flags(args, at_least: Optional[dict] = None) -> None:
    """Every float flag is a finite number (NaN passes every comparison, so range checks alone let it through), every
    integer flag fits the int32 of the jitted code, the seeds fit JAX's 32-bit seeds, and each flag named in
    ``at_least`` is at least its value."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31:  # int32 inside jit
            raise InputError(f"--{name.replace('_', '-')} must be below 2^31, got {value}")
    num_seeds = getattr(args, "num_seeds", 1)  # a script of one run per process has no --num-seeds
    if args.seed < 0 or args.seed + num_seeds > 2**31:  # JAX seeds are 32-bit integers
        raise InputError(f"--seed {args.seed} and --num-seeds {num_seeds} must keep every seed in 0..2^31-1")
    for name, low in (at_least or {}).items():
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")


def check_fits(what: str, nbytes: float) -> None:
    """Refuse, before any work, a request whose arrays alone would exceed this machine's memory."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > have:
        raise InputError(f"{what} needs about {nbytes / 2**30:.3g} GiB, more than this machine's "
                         f"{have / 2**30:.0f} GiB")


def host_devices() -> None:
    """One XLA host device per CPU core, so that vmapped seeds run in parallel on a CPU (JAX's own config, set
    before JAX starts its backends); an ``XLA_FLAGS`` of the user's, or backends already running, are left alone."""
    if "XLA_FLAGS" not in os.environ:
        try:
            jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
        except RuntimeError:  # JAX has already started (a script called from Python after other JAX work)
            pass


def run(main, args) -> None:
    """``main(args)`` as a command: bad input, a full memory, Ctrl-C and SIGTERM end in one sentence, not a traceback.

    A signal (SIGINT, SIGTERM) stops the run at the next Python instruction of the main thread (a KeyboardInterrupt)
    and the process leaves with ``os._exit`` (status 128 + the signal's number) after printing the sentence: a
    ``sys.exit`` would run the interpreter's finalisation while XLA's compile and execution threads still run, which
    ends in a segmentation fault. A watcher thread, woken by the signal itself (``signal.set_wakeup_fd``), leaves in
    the same way when the main thread has not left within ``SIGNAL_GRACE_S`` seconds: when the interrupt was raised
    inside a callback that swallows it (JAX's ``_xla_gc_callback``: "Exception ignored in ..."), or the main thread
    is inside a long XLA compile, where no Python instruction runs. A second signal leaves at once. Checkpoints and
    outputs are renamed into place whole, so leaving at any instant keeps the last checkpoint intact."""
    watcher = _SignalWatcher(args)
    try:
        start_processes()
        host_devices()
        main(args)
    except InputError as e:
        watcher.exit(f"error: {e}")
    except KeyboardInterrupt:
        watcher.exit(interrupted_message(args))
    except Exception as e:  # XLA's allocation failures and NumPy's MemoryError
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            sys.exit(f"error: out of memory ({type(e).__name__}); lower the flags that size the run (--num-seeds, "
                     f"--batch-size, the chunk sizes, the schedule's lengths)")
        raise
    finally:
        watcher.stop()


SIGNAL_GRACE_S = 2.0
_LEAVING = threading.Lock()


def interrupted_message(args) -> str:
    """What an interrupted run says: where its checkpoint is, or that there is none."""
    path = checkpoint_path(args.out)
    if os.path.exists(path):
        return f"interrupted: progress is saved in {path}; run the same command with --resume to continue"
    return "interrupted before the first checkpoint; nothing was saved"


def _leave(message: str, status: int) -> None:
    """Print ``message`` and end the process at once, from any thread (the first caller wins)."""
    _LEAVING.acquire()  # never released: the process ends here
    try:
        sys.stdout.flush()
    except Exception:  # a closed or full stdout must not keep the sentence from being printed
        pass
    os.write(2, (message + "\n").encode())
    os._exit(status)


class _SignalWatcher:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread; a thread woken by the signal leaves the
    process (``_leave``) when the main thread has not within ``SIGNAL_GRACE_S``, or at a second signal. Installed
    only in the main thread, and not over a signal that is ignored (a job started in the background by a shell
    script ignores SIGINT); ``stop`` puts back the handlers it found (a run called from Python, e.g. a test)."""

    def __init__(self, args):
        self.args, self.signum, self.thread = args, None, None
        if threading.current_thread() is not threading.main_thread():
            return
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}  # ignored by whoever started us: stays ignored
        self.old_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="empo-signal-watcher", daemon=True)
        self.thread.start()

    def _on_signal(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def _watch(self) -> None:
        first = None
        while True:
            ready = select.select([self.read_fd], [], [], None if first is None else SIGNAL_GRACE_S)[0]
            data = os.read(self.read_fd, 64) if ready else b""
            if b"\0" in data:  # stop(): the run is over
                return
            signums = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
            if first is not None and (signums or not ready):  # a second signal, or the grace period is over
                _leave(interrupted_message(self.args), 128 + first)
            if signums:
                first = signums[0]

    def exit(self, message: str) -> None:
        """sys.exit(message), or after a real signal ``_leave`` (no interpreter finalisation, status 128 + signal)."""
        if self.signum is not None:
            _leave(message, 128 + self.signum)
        sys.exit(message)

    def stop(self) -> None:
        if self.thread is None:
            return
        signal.set_wakeup_fd(self.old_wakeup)
        for s, handler in self.old.items():
            signal.signal(s, handler)
        os.write(self.write_fd, b"\0")
        self.thread.join()
        os.close(self.read_fd)
        os.close(self.write_fd)


# ----------------------------------------------------------------------------------------------
# Checkpoints: run identity and resume
# ----------------------------------------------------------------------------------------------

def checkpoint_path(out: str) -> str:
    """The checkpoint of the run that writes ``out``: beside it and named after it (x.npz -> x.checkpoint.npz)."""
    return os.path.splitext(os.path.abspath(out))[0] + ".checkpoint.npz"


def run_identity(args, neutral: tuple, inputs: dict) -> dict:
    """What a checkpoint belongs to: the output path, the inputs' sha256 and every flag that changes the result.

    ``neutral`` names the script's flags that leave the trained state unchanged (output and input paths, logging,
    evaluation): the checkpoint does not record them, and the inputs' paths are stood for by their sha256, so that
    moved files still resume."""
    flags = {k: v for k, v in asdict(args).items() if k not in neutral}
    identity = {"out": os.path.abspath(args.out), "inputs": inputs, "flags": flags}
    return json.loads(json.dumps(identity, default=str, sort_keys=True))


def save_checkpoint(path: str, state, unit: int, schema: str, identity: dict) -> None:
    """The leaves of a train state, the number of finished units of the schedule and the run's identity, atomically."""
    leaves = jax.tree.leaves(fetch(state))  # gathered in every process, written by process 0
    arrays = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update(unit=np.int64(unit), identity=np.array(json.dumps(identity, sort_keys=True)))
    save_npz(path, arrays, schema, {})


def save_output(args, arrays: dict, schema: str, inputs: dict) -> None:
    """A run's output: ``arrays`` written to ``args.out`` (save_npz, with the run's flags and inputs), then the
    checkpoint beside it, which has served, removed."""
    save_npz(args.out, arrays, schema, asdict(args), inputs)
    path = checkpoint_path(args.out)
    if writes_files() and os.path.exists(path):
        os.remove(path)

def resume_checkpoint(args, state_template, schema: str, identity: dict, total: int):
    """(checkpoint path, state, finished units): with --resume and a checkpoint of this run, its state and progress;
    otherwise (path, state_template, 0). A checkpoint of another run (other output, inputs or flags), of other
    sizes, or past this run's schedule of ``total`` units is refused in one sentence."""
    path = checkpoint_path(args.out)
    if not (args.resume and os.path.exists(path)):
        return path, state_template, 0
    arrays = load_npz(path, schema)
    try:
        stored = json.loads(str(arrays.get("identity", "{}")))
    except ValueError:
        stored = {}
    old, new = _flat(stored), _flat(identity)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            show = lambda v: "(none)" if v is None else (f"{v[:12]}..." if isinstance(v, str) and len(v) > 24 else v)
            raise InputError(f"{path} belongs to another run ({key} is {show(old.get(key))} there, "
                             f"{show(new.get(key))} here); delete it or drop --resume")
    unit = int(arrays.get("unit", -1))
    if not 0 <= unit <= total:
        raise InputError(f"{path} records {unit} finished units, but this run's schedule has {total}; delete it or "
                         f"drop --resume")
    leaves, treedef = jax.tree.flatten(state_template)
    restored = [np.asarray(arrays.get(f"leaf_{i:04d}")) for i in range(len(leaves))]
    if sum(k.startswith("leaf_") for k in arrays) != len(leaves) or any(
            a.shape != np.shape(b) for a, b in zip(restored, leaves)):
        raise InputError(f"{path} was written by a run with other sizes; delete it or drop --resume")
    for i, a in enumerate(restored):
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{path} holds NaN or infinite values ('leaf_{i:04d}'), which a run never saves: the "
                             f"file was changed or damaged; delete it and run without --resume to start over")
    print(f"resumed from {path} at unit {unit}/{total}")
    return path, jax.tree.unflatten(treedef, restored), unit


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a.b': leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold ``folder`` for this process while the block runs: a file ``lock`` in it names this host and pid. It is
    made whole and then linked into place (a link fails if the name exists), so that two runs never both hold
    it and no one reads a half-written lock; a lock left by a process of this host that is gone is taken over. One
    sentence when another run holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "lock")
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".lock-", delete=False) as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    try:
        for _ in range(2):
            try:
                os.link(f.name, path)
                break
            except FileExistsError:
                try:
                    host, pid = open(path).read().split()
                    alive = host != socket.gethostname() or _pid_alive(int(pid))
                except FileNotFoundError:  # released in between: try again
                    continue
                if alive:
                    raise InputError(f"{folder} is in use by another run ({host}, pid {pid}); wait for it to end, or "
                                     f"give this run another --out (remove {path} if no such run is going)") from None
                os.remove(path)
        else:
            raise InputError(f"cannot take the lock {path}: another run took it at the same time")
    finally:
        os.remove(f.name)
    try:
        yield
    finally:
        os.remove(path)
