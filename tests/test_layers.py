"""The package's layers: every module imports only from its own layer or the ones below it.

    0  quartic.core       the mathematics (curvature, AIC, theory, dynamics, fitting, families)
    1  quartic.models     the transformer
       quartic.tasks      the token world, the synonym world
       quartic.harness    configs, run folders, checkpoints, plots, sharding (not the commands)
       quartic.testing    assertions for users' scaling-law tests
    2  quartic.studies    the studies (collapse, transfer, defences, forecast, ladder, law, diagnose)
    3  quartic.harness.cli, quartic.harness.diagnose_command, quartic (the package's re-exports)

Imports are read from the source (``ast``), function-level ones included, so a lazy import cannot
hide a cycle. A second test feeds the checker a tree that breaks the rule, so this test can fail.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "quartic"

TOP = ("quartic.harness.cli", "quartic.harness.diagnose_command")
RANKS = (  # (module prefix, layer); the longest matching prefix wins
    ("quartic.core", 0),
    ("quartic.models", 1),
    ("quartic.tasks", 1),
    ("quartic.harness", 1),
    ("quartic.testing", 1),
    ("quartic.studies", 2),
    *((name, 3) for name in TOP),
    ("quartic", 3),
)


def layer(module: str) -> int:
    best = max((p for p, _ in RANKS if module == p or module.startswith(p + ".")), key=len)
    return dict(RANKS)[best]


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def quartic_imports(source: str, module: str) -> set[str]:
    """Every ``quartic...`` module the source imports, at any depth (``from a import b`` gives
    ``a.b`` when ``b`` is a submodule name, else ``a``)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "quartic"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "quartic":
                out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return out


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names that are not modules are dropped)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = {m for m in quartic_imports(path.read_text(), mod) if m in files and m != mod}
        # `from quartic.studies import collapse` names the submodule, not the package's __init__
        graph[mod] = {m for m in deps if not any(d.startswith(m + ".") for d in deps)}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in graph.items()
        for dep in deps
        if layer(dep) > layer(mod)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among modules (a package importing its own submodules is not one)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if node.startswith(dep + "."):  # a module reading its own package's __init__
                continue
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_imports_only_its_layer_or_below():
    graph = import_graph(ROOT)
    assert len(graph) > 30  # the walk found the package
    assert violations(graph) == []


def test_no_import_cycle_anywhere():
    assert cycles(import_graph(ROOT)) == []


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "quartic"
    for sub in ("core", "studies", "harness"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "aic.py").write_text("def f():\n    from quartic.studies import collapse\n")
    (pkg / "studies" / "collapse.py").write_text("from quartic.core import aic\n")
    (pkg / "harness" / "cli.py").write_text("import quartic.harness.runs\n")
    (pkg / "harness" / "runs.py").write_text("from quartic.harness import cli\n")
    graph = import_graph(pkg)
    assert violations(graph) == [
        "quartic.core.aic (layer 0) imports quartic.studies.collapse (layer 2)",
        "quartic.harness.runs (layer 1) imports quartic.harness.cli (layer 3)",
    ]
    found = {tuple(c) for c in cycles(graph)}
    assert ("quartic.core.aic", "quartic.studies.collapse", "quartic.core.aic") in found
    assert ("quartic.harness.cli", "quartic.harness.runs", "quartic.harness.cli") in found


@pytest.mark.parametrize("name", ["quartic.core.x", "quartic.harness.cli", "quartic.studies.a.b"])
def test_layer_table_reads_the_longest_prefix(name):
    assert layer(name) == {"quartic.core.x": 0, "quartic.harness.cli": 3}.get(name, 2)
