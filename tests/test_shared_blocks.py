"""The deliberate shared blocks (STYLE.md §1) must stay identical in every file that carries them."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^# --- shared block: (\w+) \(keep identical across stages\) ---\n"
                   r"(.*?)^# --- end shared block: \1 ---$", re.S | re.M)


def _blocks():
    found = {}
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("baselines/*.py")):
        for name, body in BLOCK.findall(path.read_text()):
            found.setdefault(name, []).append((path.name, body))
    return found


def test_shared_blocks_are_identical():
    blocks = _blocks()
    assert "npz_io" in blocks and "dataset" in blocks
    for name, copies in blocks.items():
        first_file, first = copies[0]
        for other_file, body in copies[1:]:
            assert body == first, f"shared block '{name}' differs between {first_file} and {other_file}"


def test_every_stage_carries_the_io_blocks():
    blocks = _blocks()
    for stage in ["empo_cluster.py", "empo_ppo.py", "empo_highlevel.py"]:
        if (ROOT / stage).exists():
            for name in ["npz_io", "dataset", "run_utils", "networks", "checkpoint"]:
                assert stage in [f for f, _ in blocks.get(name, [])], f"{stage} lacks the shared block '{name}'"


def test_no_stage_imports_another_stage():
    for stage in ["empo_cluster.py", "empo_ppo.py", "empo_highlevel.py"]:
        path = ROOT / stage
        if path.exists():
            assert not re.search(r"^\s*(from|import)\s+empo_(cluster|ppo|highlevel)\b", path.read_text(), re.M)


def test_progress_estimates_each_kind_of_unit_by_its_own_mean_time(monkeypatch, capsys):
    import sys

    sys.path.insert(0, str(ROOT))
    import empo_ppo

    clock = iter([0.0, 1.0, 2.0, 12.0, 112.0])  # start; then units of 1 s, 1 s, 10 s, 100 s
    monkeypatch.setattr(empo_ppo.time, "perf_counter", lambda: next(clock))
    progress = empo_ppo.Progress(7, "t", kinds=["q", "q", "v", "pi", "pi", "pi", "v"], first=0)
    for done in (1, 2, 3, 4):
        progress(done)
    lines = capsys.readouterr().out.splitlines()
    assert "left ~5s" in lines[1]  # q known (1 s); v and pi not yet seen: the mean of all finished units
    assert "left ~210s" in lines[3]  # two pi at 100 s and one v at 10 s
    monkeypatch.setattr(empo_ppo.time, "perf_counter", iter([0.0, 5.0]).__next__)
    resumed = empo_ppo.Progress(4, "r", first=2)  # a resumed run does not count the units done before it
    resumed(3)
    assert "left ~5s" in capsys.readouterr().out
