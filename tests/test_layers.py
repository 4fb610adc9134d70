"""The package's layers: no import cycles (statistics know no method), and light modules stay light."""

from __future__ import annotations

import ast
import pathlib

import dppa_stream

ROOT = pathlib.Path(dppa_stream.__file__).parent

# Lazy (function-local) imports that still close a cycle, each with why it is left: none may be added.
KNOWN_LAZY_CYCLES = {
    frozenset({"dppa_stream.sources", "dppa_stream.units"}),  # decoded reads <-> scratch buffers (moe2/lora area)
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """Edges module -> package module it imports (a package's own ancestors excluded: Python
    initialises them first whatever imports what)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, f in mods.items():
        tree = ast.parse(f.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        pkg = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{name}.{a.name}" if f"{name}.{a.name}" in mods else name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in mods and t != mod and not mod.startswith(t + "."))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_graph_sees_imports():
    graph = import_graph()
    assert "dppa_stream.methods.sparsify" in graph["dppa_stream.methods.gta"]
    assert "dppa_stream.kernels" in graph["dppa_stream.statistics"]


def test_no_import_cycles():
    assert cycles(import_graph(top_level_only=True)) == []
    left = [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN_LAZY_CYCLES]
    assert left == [], "import cycles (lazy imports included): " + "; ".join(" -> ".join(c) for c in left)


def test_statistics_know_no_method():
    graph = import_graph()
    for mod in ("dppa_stream.statistics", "dppa_stream.stats_store", "dppa_stream.summaries"):
        assert not [m for m in graph[mod] if m.startswith("dppa_stream.methods")], mod


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter; its stdout."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_parsing_a_config_imports_no_numba():
    out = _fresh("import sys\n"
                 "from dppa_stream.config import parse_config\n"
                 "cfg = parse_config('merge_method: ties\\nbase_model: b\\nmodels:\\n  - model: a\\n"
                 "    parameters: {weight: 1, density: 0.5}\\n', '<test>')\n"
                 "cfg.method(0)\n"
                 "print(cfg.merge_method, 'numba' in sys.modules, 'dppa_stream.kernels.core' in sys.modules)")
    assert out.split() == ["ties", "False", "False"]


def test_the_library_imports_no_click():
    """Progress is a callback the CLI passes: the library's layers never draw bars themselves."""
    out = _fresh("import sys\n"
                 "import dppa_stream.pipeline, dppa_stream.executor, dppa_stream.search, dppa_stream.stats_report\n"
                 "print('click' in sys.modules)")
    assert out.split() == ["False"]


def test_kernels_load_on_first_use():
    out = _fresh("import sys\n"
                 "from dppa_stream import kernels\n"
                 "a = 'numba' in sys.modules\n"
                 "kernels.gta, kernels.della_layout, kernels.FP8_CODES\n"
                 "print(a, 'numba' in sys.modules, kernels.SP_NONE == kernels.delta.SP_NONE)")
    assert out.split() == ["False", "True", "True"]


def test_progress_is_a_callback(tmp_path, ckpts):
    """The library reports each phase's bytes to the callback it is given (the CLI's bar), and
    the updates add up to the phase's total."""
    import contextlib

    from dppa_stream.config import parse_config
    from dppa_stream.pipeline import MergeOptions, merge

    base, ft1, ft2 = ckpts()
    cfg = parse_config(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                       f"  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                       f"  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n", "<test>")
    phases = []

    @contextlib.contextmanager
    def bar(label, total):
        got = []
        yield got.append
        phases.append((label, total, sum(got)))

    res = merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True, progress=bar))
    assert [p[0] for p in phases][-1] == "merge"  # (one-unit tensors get their statistics inside pass 2)
    assert all(total == done > 0 for _, total, done in phases), phases
    assert res.bytes_read >= sum(total for _, total, _ in phases)
