"""The docs name real things: every test, notebook, experiment and quartic function they cite exists.

``docs/theory_map.md`` maps each definition and theorem to the function that computes it and the
test that checks it; the README and the other pages cite tests and scripts too. A rename that
leaves a page behind fails here, naming the page and the reference.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_REF = re.compile(r"tests/(\w+\.py)::(\w+)")
SCRIPT_REF = re.compile(r"\b((?:notebooks|experiments|benchmarks)/[a-z0-9_]+\.py)\b")
CODE = re.compile(r"`([^`]+)`")
# Names under `quartic`: the public core modules (`aic.check_aic`) and the subpackages
# (`studies.collapse.skill_curvature`, `tasks.token_world.kl_from_logits`).
QUARTIC_MODULES = {
    p.stem for p in (ROOT / "quartic" / "core").glob("*.py") if p.stem != "__init__"
} | {p.name for p in (ROOT / "quartic").iterdir() if (p / "__init__.py").exists()}


def _refs(pattern):
    return sorted({(page.name, m) for page in PAGES for m in pattern.findall(page.read_text())})


def _test_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("page, ref", _refs(TEST_REF), ids=lambda x: str(x))
def test_cited_tests_exist(page, ref):
    file, name = ref
    path = ROOT / "tests" / file
    assert path.exists(), f"{page} cites tests/{file}, which does not exist"
    assert name in _test_names(path), f"{page} cites tests/{file}::{name}, which does not exist"


@pytest.mark.parametrize("page, ref", _refs(SCRIPT_REF), ids=lambda x: str(x))
def test_cited_scripts_exist(page, ref):
    assert (ROOT / ref).exists(), f"{page} cites {ref}, which does not exist"


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    try:
        obj = importlib.import_module(f"quartic.{parts[0]}")
    except ModuleNotFoundError:
        return False
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule (tasks.token_world)
            obj = importlib.import_module(f"quartic.{'.'.join(parts[: i + 1])}")
            continue
        except ModuleNotFoundError:
            pass
        # a dataclass field or NamedTuple field without a class-level value
        fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "_fields", ())
        annotations = getattr(obj, "__annotations__", {})
        if part in fields or part in annotations or _assigned_on_self(obj, part):
            return i == len(parts) - 1
        return False
    return True


def _assigned_on_self(cls, attr: str) -> bool:
    """An instance attribute the class sets in its own code (``self.attr = ...``)."""
    if not isinstance(cls, type):
        return False
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(rf"\bself\.{attr}\s*=", source) is not None


def _function_refs():
    page = ROOT / "docs" / "theory_map.md"
    out = set()
    for code in CODE.findall(page.read_text()):
        name = code.split("(")[0].strip()
        if re.fullmatch(r"[a-z_]+(\.[A-Za-z_][A-Za-z0-9_]*)+", name):
            if name.split(".")[0] in QUARTIC_MODULES:
                out.add(name)
    return sorted(out)


def test_theory_map_cites_functions():
    assert len(_function_refs()) > 40  # the pattern finds the table's functions


@pytest.mark.parametrize("name", _function_refs())
def test_theory_map_functions_exist(name):
    assert _resolve(name), f"docs/theory_map.md cites quartic.{name}, which does not exist"
