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
