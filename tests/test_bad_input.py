"""Nothing lost, ever: hostile and careless input to every entry point, and what each stage adds to empo_io.

The promises empo_io keeps for every script (temporary files, NaN arrays, a full disk, the umask, files that are
not .npz, one sentence for a full memory, the checkpoint's identity) are tested once, in test_empo_io.py. Here,
each stage's own duty: it passes its inputs to check_writable, refuses its flags and impossible requests before any
work, checks its own inputs (arch entries, provenance), and resumes to the result of an uninterrupted run. Every
refusal is one sentence, and inputs and earlier outputs are left byte-identical.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from np_reference import sha256_file

import empo_cluster as ec
import empo_highlevel as eh
import empo_io
import empo_ppo as ep
import nav_env
from baselines import bc, iql, td3_bc

STAGES = {"cluster": ec, "ppo": ep, "highlevel": eh, "bc": bc, "td3_bc": td3_bc, "iql": iql}


def _cluster_args(dataset, out, **kw):
    base = dict(dataset=str(dataset), out=str(out), bias_epochs=1, pretrain_epochs=2, em_epochs=3, hidden_dim=32,
                log_every=1)
    return ec.Args(**{**base, **kw})


def _ppo_args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), cluster=str(root / "cluster.npz"), out=str(out), q_steps=400,
                steps_per_call=200, v_epochs=1, pi_epochs=2, eval_episodes=0)
    return ep.Args(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small data set, a stage-1 run on it, and a second data set with other numbers."""
    root = tmp_path_factory.mktemp("bad_input")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "tiny.npz"), data, empo_io.DATASET_SCHEMA, {})
    other = nav_env.generate_dataset(seed=1, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "other.npz"), other, empo_io.DATASET_SCHEMA, {})
    ec.main(_cluster_args(root / "tiny.npz", root / "cluster.npz"))
    return root


def _snapshot(folder) -> dict:
    """Every file under folder and its bytes."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _refused(module, args, match: str):
    with pytest.raises(module.InputError, match=match) as err:
        module.main(args)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- 1. An output never replaces an input --------------------------------------------------------

@pytest.mark.parametrize("stage, flag", [("cluster", "dataset"), ("ppo", "cluster"), ("highlevel", "ppo"),
                                         ("bc", "dataset"), ("td3_bc", "dataset"), ("iql", "dataset"),
                                         ("ppo", "dataset")])
def test_an_output_that_is_an_input_is_refused(tmp_path, stage, flag):
    """The stage passes the input to check_writable: a hard link to it (which only check_writable's inode test tells
    from another file) is refused. Same paths and symbolic links: test_empo_io.py."""
    module = STAGES[stage]
    source = tmp_path / "input.npz"
    source.write_bytes(b"precious input")
    out = tmp_path / "hard.npz"
    os.link(source, out)
    args = dataclasses.replace(module.Args(), **{flag: str(source), "out": str(out)})
    _refused(module, args, "refusing to write .* it is the input")
    assert source.read_bytes() == b"precious input"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.npz", "input.npz"]


def test_nav_env_figure_cannot_replace_the_data_set(tmp_path):
    out = tmp_path / "nav.npz"
    with pytest.raises(empo_io.InputError, match="refusing to write"):
        nav_env.main(nav_env.Args(out=str(out), figure=str(out), transitions_per_behaviour=100))
    assert not out.exists()


# --- 2. A checkpoint belongs to one run ----------------------------------------------------------

def _interrupt_at(monkeypatch, module, unit: int):
    def interrupt(self, done, **fields):
        if done == unit:
            raise KeyboardInterrupt

    monkeypatch.setattr(module.Progress, "__call__", interrupt)


def test_ctrl_c_then_only_this_run_resumes_its_checkpoint(tiny, tmp_path, monkeypatch):
    """Ctrl-C says where the checkpoint is; another run (flags, data, output) cannot take it; this run resumes it
    to the result of an uninterrupted run (the fixture's, made with the same flags)."""
    out = tmp_path / "cluster.npz"
    args = _cluster_args(tiny / "tiny.npz", out, checkpoint_every=1)
    _interrupt_at(monkeypatch, ec, 2)
    with pytest.raises(SystemExit) as ended:
        empo_io.run(ec.main, args)
    monkeypatch.undo()
    message = str(ended.value.code)
    ckpt = tmp_path / "cluster.checkpoint.npz"
    assert message.startswith("interrupted:") and "\n" not in message
    assert str(ckpt) in message and "--resume" in message
    before = ckpt.read_bytes()
    for change, field in [(dict(learning_rate=1e-3), "flags.learning_rate"), (dict(seed=7), "flags.seed"),
                          (dict(dataset=str(tiny / "other.npz")), "inputs.dataset"),
                          (dict(em_epochs=50), "flags.em_epochs"), (dict(momentum=0.5), "flags.momentum")]:
        message = _refused(ec, dataclasses.replace(args, resume=True, **change), f"belongs to another run \\({field}")
        assert str(ckpt) in message and "--resume" in message
        assert ckpt.read_bytes() == before and not out.exists()
    # Another output in the same folder has its own checkpoint: it starts afresh and leaves this one alone.
    ec.main(dataclasses.replace(args, out=str(tmp_path / "b.npz"), seed=5, resume=True))
    assert ckpt.read_bytes() == before and not (tmp_path / "b.checkpoint.npz").exists()
    # This run resumes; a moved copy of the data set (the same digest) is the same input.
    moved = tmp_path / "moved.npz"
    moved.write_bytes((tiny / "tiny.npz").read_bytes())
    ec.main(dataclasses.replace(args, resume=True, dataset=str(moved)))
    assert not ckpt.exists()
    resumed, full = np.load(out), np.load(tiny / "cluster.npz")
    np.testing.assert_array_equal(resumed["assignments"], full["assignments"])
    np.testing.assert_allclose(resumed["posterior"], full["posterior"], atol=1e-6)


def test_a_checkpoint_past_the_schedule_is_refused(tiny, tmp_path):
    args = _cluster_args(tiny / "tiny.npz", tmp_path / "cluster.npz", resume=True)
    data, digest = empo_io.load_dataset(args.dataset)
    state = {"x": np.zeros(3, np.float32)}
    empo_io.save_checkpoint(empo_io.checkpoint_path(args.out), state, 50, "empo/cluster-checkpoint/v2",
                       empo_io.run_identity(args, ec.NEUTRAL_FLAGS, {"dataset": digest}))
    _refused(ec, args, "records 50 finished units, but this run's schedule has 6")
    assert not os.path.exists(args.out)


# --- 3. Non-finite flags --------------------------------------------------------------------------

@pytest.mark.parametrize("stage", list(STAGES))
def test_non_finite_float_flags_are_refused(stage):
    """Every float flag of the stage goes through check_flags (NaN; infinities: test_empo_io.py)."""
    module = STAGES[stage]
    value = float("nan")
    floats = [f.name for f in dataclasses.fields(module.Args) if isinstance(getattr(module.Args(), f.name), float)]
    assert "learning_rate" in floats
    for name in floats:
        with pytest.raises(module.InputError, match=f"--{name.replace('_', '-')} must be a finite number"):
            module.validate_args(dataclasses.replace(module.Args(), **{name: value}))


# --- 4. nav_env checks everything before it writes anything --------------------------------------

@pytest.mark.parametrize("minari_id, message", [("no version", "is not a Minari id"), ("a/b-vx", "is not a Minari id"),
                                                ("empo/taken-v0", "already exists")])
def test_nav_env_checks_the_minari_id_before_writing(tmp_path, monkeypatch, minari_id, message):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    (tmp_path / "store" / "empo" / "taken-v0").mkdir(parents=True)
    out = tmp_path / "nav.npz"
    with pytest.raises(empo_io.InputError, match=message):
        nav_env.main(nav_env.Args(out=str(out), minari_id=minari_id, transitions_per_behaviour=100))
    assert not out.exists()


# --- 5-8. Silently wrong before -----------------------------------------------------------------

@pytest.mark.parametrize("b", [0.5, 0.999, 0.0, -1.0])
def test_b_below_one_is_refused(b):
    with pytest.raises(empo_io.InputError, match="--b must be at least 1"):
        eh.validate_args(eh.Args(b=b))
    eh.validate_args(eh.Args(b=1.0))


def test_a_resumed_stage_1_run_keeps_its_rand_index_history(tiny, tmp_path, monkeypatch):
    cut = _cluster_args(tiny / "tiny.npz", tmp_path / "cluster.npz", checkpoint_every=1)
    _interrupt_at(monkeypatch, ec, 5)  # after the second of three EM epochs
    with pytest.raises(KeyboardInterrupt):
        ec.main(cut)
    monkeypatch.undo()
    ec.main(dataclasses.replace(cut, resume=True))
    full, resumed = np.load(tiny / "cluster.npz"), np.load(cut.out)  # the fixture: the same run, uninterrupted
    assert full["rand_index_history"].shape == (1, 3)
    np.testing.assert_array_equal(full["rand_index_history"], resumed["rand_index_history"])
    assert np.all(resumed["rand_index_history"] > 0.4)  # every EM epoch recorded, those before the interrupt too


def test_provenance_is_the_file_as_read(tiny, tmp_path, monkeypatch):
    """cluster.npz replaced during stage 2: ppo.npz records the digest of the bytes that were used."""
    cluster = tmp_path / "cluster.npz"
    cluster.write_bytes((tiny / "cluster.npz").read_bytes())
    used = sha256_file(str(cluster))
    real = empo_io.make_writer

    def replace_input(*a, **kw):  # called after the inputs are read, before training
        cluster.write_bytes(b"replaced while the run was going on")
        return real(*a, **kw)

    monkeypatch.setattr(ep, "make_writer", replace_input)
    out = tmp_path / "ppo.npz"
    ep.main(_ppo_args(tiny, out, cluster=str(cluster)))
    assert json.loads(str(np.load(out)["inputs"]))["cluster"] == used


def test_observation_statistics_are_computed_in_float64(tiny):
    obs = np.zeros((6, 2), np.float32)
    obs[0, 0], obs[1, 0] = 3e38, -3e38  # finite in float32, but their float32 variance overflows
    mean, std = ec.observation_stats("d", obs)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and std[0] > 1e38
    assert np.all(np.isfinite((obs - mean) / std))
    with np.errstate(over="ignore"):
        assert not np.isfinite(obs.std(0)[0])  # what a float32 computation gave


@pytest.mark.parametrize("key, value, message", [
    ("arch/obs_std", 0.0, "'arch/obs_std' must be positive"),
    ("arch/action_scale", -0.2, "'arch/action_scale' must be positive"),
    ("arch/hidden_dim", 48, "has shape .* per run, but its arch/\\* entries give"),
    ("arch/hidden_layers", 2, "has no key|but its arch/\\* entries give"),
    ("arch/hidden_layers", 0, "'arch/hidden_layers' must be at least 1"),
])
def test_hand_edited_arch_entries_are_refused(tiny, tmp_path, key, value, message):
    arrays = dict(np.load(tiny / "cluster.npz"))
    arrays[key] = np.full_like(arrays[key], value)
    bad = tmp_path / "cluster.npz"
    np.savez(bad, **arrays)
    for module, args in [(ep, _ppo_args(tiny, tmp_path / "ppo.npz", cluster=str(bad))),
                         (eh, eh.Args(dataset=str(tiny / "tiny.npz"), cluster=str(bad), ppo=str(bad),
                                      out=str(tmp_path / "highlevel.npz"), eval_episodes=0))]:
        if module is eh and key == "arch/action_scale":
            continue  # stage 3 takes the action scale from ppo.npz
        _refused(module, args, message)
    assert sorted(os.listdir(tmp_path)) == ["cluster.npz"]


# --- Tracebacks that are now one sentence ------------------------------------------------------

@pytest.mark.parametrize("stage", list(STAGES))
def test_absurd_integer_flags_are_refused(stage):
    module = STAGES[stage]
    base = module.Args()
    cases = [(name, value) for name, value in [("num_seeds", 0), ("batch_size", 0), ("hidden_dim", 0),
                                               ("hidden_layers", -1), ("hidden_layers", 0), ("log_every", 0),
                                               ("steps_per_call", 0), ("eval_episodes", -1),
                                               ("checkpoint_every", -1), ("first_run", -1)]
             if hasattr(base, name)]
    assert cases
    for name, value in cases:
        with pytest.raises(module.InputError, match=f"--{name.replace('_', '-')} must be at least"):
            module.validate_args(dataclasses.replace(base, **{name: value}))


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_output_path_without_a_file_name_is_refused(stage, tmp_path, monkeypatch):
    """The stage checks --out before any work: no folder is made (an empty path: test_empo_io.py)."""
    monkeypatch.chdir(tmp_path)
    module = STAGES[stage]
    with pytest.raises(module.InputError, match="names no file"):
        module.main(dataclasses.replace(module.Args(), out="runs/"))
    assert os.listdir(tmp_path) == []


# --- Smaller ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [(dict(transitions_per_behaviour=10 ** 12), "GiB for the data set, more than"),
                                         (dict(figure="map.npz"), "must end in .png"),
                                         (dict(transitions_per_behaviour=0), "must be at least 1")])
def test_nav_env_refuses_impossible_requests_before_writing(tmp_path, kw, message):
    out = tmp_path / "nav.npz"
    with pytest.raises(empo_io.InputError, match=message):
        nav_env.main(nav_env.Args(out=str(out), **{"figure": None, **kw}))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage", list(STAGES))
def test_seeds_outside_jax_32_bit_range_are_refused(stage):
    """The stage's last seed, not only its first, is checked (the other cases: test_empo_io.py)."""
    module = STAGES[stage]
    with pytest.raises(module.InputError, match="must keep every seed in 0..2\\^31-1"):
        module.validate_args(dataclasses.replace(module.Args(), seed=2 ** 31 - 10, num_seeds=20))
    module.validate_args(dataclasses.replace(module.Args(), seed=2 ** 31 - 2, num_seeds=2))


@pytest.mark.parametrize("stage", ["cluster", "bc", "td3_bc", "iql"])
@pytest.mark.parametrize("flag", ["hidden_dim", "hidden_layers"])
def test_networks_larger_than_the_memory_are_refused_before_any_work(stage, flag):
    module = STAGES[stage]
    with pytest.raises(module.InputError, match="needs about .* GiB, more than this machine's"):
        module.validate_args(dataclasses.replace(module.Args(), **{flag: 2 ** 30}))


@pytest.mark.parametrize("stage", ["bc", "td3_bc", "iql"])
def test_evaluations_larger_than_the_memory_are_refused_before_any_work(stage):
    module = STAGES[stage]
    with pytest.raises(module.InputError, match="--eval-episodes 1073741824 needs about"):
        module.validate_args(dataclasses.replace(module.Args(), eval_episodes=2 ** 30))


def test_stage_2_refuses_an_evaluation_larger_than_the_memory_before_training(tiny, tmp_path):
    _refused(ep, _ppo_args(tiny, tmp_path / "ppo.npz", eval_episodes=2 ** 30), "--eval-episodes .* needs about")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage", list(STAGES))
def test_integer_flags_beyond_int32_are_refused(stage):
    module = STAGES[stage]
    base = module.Args()
    names = [f.name for f in dataclasses.fields(base) if type(getattr(base, f.name)) is int and f.name != "seed"]
    assert names
    for name in names:
        with pytest.raises(module.InputError, match=f"--{name.replace('_', '-')} must be below 2\\^31"):
            module.validate_args(dataclasses.replace(base, **{name: 2 ** 31}))
