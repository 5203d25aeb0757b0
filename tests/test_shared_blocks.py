"""The deliberate shared blocks (STYLE.md §1) must stay identical in every file that carries them."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGE_FILES = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("baselines/*.py"))
BANNER = "# Plumbing shared by every stage: identical copies, checked by tests/test_shared_blocks.py."
BLOCK = re.compile(r"^# --- shared block: (\w+) \(keep identical across stages\) ---\n"
                   r"(.*?)^# --- end shared block: \1 ---$", re.S | re.M)


def _blocks():
    found = {}
    for path in STAGE_FILES:
        for name, body in BLOCK.findall(path.read_text()):
            found.setdefault(name, []).append((path.name, body))
    return found


def _names(node) -> list:
    """The top-level names a statement defines (def, class, or the names assigned)."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    return [n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]


def _definitions(body: str) -> dict:
    """{name: source} of a block's top-level definitions, each with the comments just above it."""
    lines, units, start = body.split("\n"), {}, 0
    for node in ast.parse(body).body:
        names = _names(node)
        source = "\n".join(lines[start:node.end_lineno]).strip("\n")
        for name in names or [f"<statement at line {node.lineno}>"]:
            units[name] = source
        start = node.end_lineno
    return units


def test_shared_definitions_are_identical_wherever_they_are_copied():
    """A file copies the definitions of a shared block that it uses; each copy is identical to every other, and
    the copies keep one order."""
    blocks = _blocks()
    assert "npz_io" in blocks and "dataset" in blocks
    for name, copies in blocks.items():
        seen, order = {}, []
        for file, body in copies:
            units = _definitions(body)
            for unit, source in units.items():
                if unit in seen:
                    assert source == seen[unit][1], (
                        f"shared block '{name}': {unit} differs between {seen[unit][0]} and {file}")
                else:
                    seen[unit] = (file, source)
                    order.append(unit)
            positions = [order.index(u) for u in units]
            assert positions == sorted(positions), f"shared block '{name}' in {file} is not in the common order"


def _used_names(tree: ast.Module, definitions: dict, shared: set) -> set:
    """Top-level names reachable from the file's own code (everything but its shared definitions)."""
    def refs(node):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}

    roots = set()
    for node in tree.body:
        if not set(_names(node)) & shared:
            roots |= refs(node)
    used, stack = set(), [n for n in roots if n in definitions]
    while stack:
        name = stack.pop()
        if name not in used:
            used.add(name)
            stack += [m for m in refs(definitions[name]) if m in definitions]
    return used


def test_no_file_carries_shared_code_it_does_not_use():
    """Dead copies are dropped; unflatten_params stays beside flatten_params as the reader of the file's output."""
    for path in STAGE_FILES:
        text = path.read_text()
        tree = ast.parse(text)
        definitions = {}
        for node in tree.body:
            for name in _names(node):
                definitions[name] = node
        shared = {unit for _, body in BLOCK.findall(text) for unit in _definitions(body)}
        unused = shared - _used_names(tree, definitions, shared) - {"unflatten_params"}
        assert not unused, f"{path.name} carries shared definitions it never uses: {sorted(unused)}"


def test_each_stage_reads_algorithm_first_and_plumbing_last():
    """Losses and main come before the plumbing banner; below it only shared blocks; the __main__ guard is last
    (it runs main, so every definition must exist by then)."""
    for path in STAGE_FILES:
        text = path.read_text()
        banner = text.index(BANNER)
        tree = ast.parse(text)
        last = tree.body[-1]
        assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), f"{path.name}: the guard is not last"
        for name, _ in BLOCK.findall(text):
            start = text.index(f"# --- shared block: {name} ")
            assert (start > banner) == (name != "networks"), f"{path.name}: block '{name}' on the wrong side"
        if "def main(" in text:
            assert text.index("def main(") < banner, f"{path.name}: main is below the plumbing"
        plumbing = text[text.index("\n", text.index("\n# ===", banner) + 1):text.rindex('if __name__ == "__main__":')]
        assert not BLOCK.sub("", plumbing).strip(), f"{path.name}: code other than shared blocks below the banner"


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
