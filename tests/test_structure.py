"""The shape of helpers/, read from the source: no import circle among its modules, the core imports
nothing of ours, and no code outside the two backends asks which backend runs."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKEND_DIRS = ("helpers/embedded", "helpers/gpu")
CORE = ("helpers.runtime", "helpers.settings", "helpers.prompts", "helpers.metrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / "helpers").rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The helpers modules `name` imports, at module level or inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {t for t in targets if t in MODULES and MODULES[t].name != "__init__.py"}
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


def test_the_graph_is_read():
    """A guard on the parser: known edges are found, relative and absolute."""
    assert "helpers.runtime" in GRAPH["helpers.engines"]
    assert {"helpers.runtime", "helpers.prompts", "helpers.settings"} <= GRAPH["helpers.gpu.launch"]
    assert "helpers.embedded.blend" in GRAPH["helpers.embedded.generate"]


def test_no_import_cycle():
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


@pytest.mark.parametrize("name", CORE)
def test_core_modules_import_nothing_of_ours(name):
    assert GRAPH[name] == set(), GRAPH[name]


def test_backends_do_not_import_the_launcher_or_each_other():
    for name, deps in GRAPH.items():
        if name.startswith("helpers.gpu"):
            assert not {d for d in deps if d.startswith("helpers.embedded") or d == "helpers.engines"}, name
        if name.startswith("helpers.embedded"):
            assert not {d for d in deps if d.startswith("helpers.gpu") or d == "helpers.engines"}, name


def backend_branches(source: str) -> list[str]:
    """Comparisons with a backend's name, or of a `.backend` with a string: `e.backend == "vllm"` and kin
    (two engines' backends compared with each other are no branch)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = any(isinstance(s, ast.Constant) and s.value in ("vllm", "embedded") for s in sides)
        attrs = any(isinstance(s, ast.Attribute) and s.attr == "backend" for s in sides)
        strings = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
        if names or (attrs and strings):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_backend_branch_outside_the_backends():
    outside = [p for p in (ROOT / "helpers").rglob("*.py")
               if not str(p.relative_to(ROOT)).startswith(BACKEND_DIRS)]
    assert outside
    found = [f"{p.relative_to(ROOT)} {b}" for p in outside for b in backend_branches(p.read_text())]
    assert not found, "\n".join(found)


def test_the_check_sees_a_branch():
    assert len(backend_branches('if e.backend == "vllm":\n    pass\n')) == 1
    assert len(backend_branches('if e.backend != "unknown":\n    pass\n')) == 1
    assert not backend_branches('kind = "vllm" if gpus else "embedded"\nsame = a.backend == b.backend\n')


def test_launcher_passes_ratio_and_check_layer(monkeypatch, capsys):
    """`launch_engines.sh --ratio R --check-layer L` reaches the engines of either backend."""
    from helpers import engines, launcher

    got = {}

    def fake_start(backend, model, blend_port, full_port, timeout, **kw):
        got.update(kw)
        return []

    monkeypatch.setattr(engines, "start", fake_start)
    assert launcher.main(["--ratio", "0.3", "--check-layer", "2", "--no-precompute"]) == 0
    assert got["ratio"] == 0.3 and got["check_layer"] == 2
    assert "ratio 0.3, check layer 2" in capsys.readouterr().out
    assert launcher.main(["--ratio", "1.5", "--no-precompute"]) == 2
    cmd = engines.backend("embedded").engines(None, 8000, 8001, ratio=0.3, check_layer=2)[0].cmd
    assert cmd[cmd.index("--ratio") + 1] == "0.3" and cmd[cmd.index("--check-layer") + 1] == "2"


def test_topk_kl_is_zero_for_equal_lists_and_grows_with_the_difference():
    from helpers.metrics import topk_kl

    a = {1: -0.1, 2: -2.5, 3: -4.0}
    assert abs(topk_kl(a, a)) < 1e-12
    near, far = {1: -0.2, 2: -2.0, 3: -4.0}, {1: -3.0, 2: -0.1, 4: -2.0}
    assert 0 < topk_kl(a, near) < topk_kl(a, far)


def test_settings_are_read_in_two_places_only():
    """No module of helpers/ reads a KVBLEND_ environment variable but settings.py (the GPU blend
    engine's settings) and runtime.py (the user's: cache, run dir, key, one GPU, version check)."""
    import re

    read = re.compile(r"""(environ(\.get)?\(|getenv\(|environ\[)\s*["']KVBLEND_""")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "helpers").rglob("*.py")
             if p.name not in ("settings.py", "runtime.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if read.search(line)]
    assert not found, found
    assert read.search('os.environ.get("KVBLEND_CACHE")') and read.search("getenv('KVBLEND_X')")
