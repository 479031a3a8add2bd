"""The docs name real things: every test, notebook, experiment and quartic function they cite exists.

``docs/theory_map.md`` maps each definition and theorem to the function that computes it and the
test that checks it; the README and the other pages cite tests and scripts too. A rename that
leaves a page behind fails here, naming the page and the reference.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
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
        if re.fullmatch(r"[a-z_]+(\.[A-Za-z_][A-Za-z0-9_]*)+", name) and not name.endswith(".md"):
            if name.split(".")[0] in QUARTIC_MODULES:
                out.add(name)
    return sorted(out)


def test_theory_map_cites_functions():
    assert len(_function_refs()) > 40  # the pattern finds the table's functions


@pytest.mark.parametrize("name", _function_refs())
def test_theory_map_functions_exist(name):
    assert _resolve(name), f"docs/theory_map.md cites quartic.{name}, which does not exist"


# ----------------------------------------------------------------------------------------------
# Every number of a results table is in a committed summary file.
#
# A results table (README.md, docs/results.md) has a column "source" naming, for each number of
# its "measured" cell, the key it comes from: `NAME:dotted.key` in results/quick/NAME/summary.json,
# `full/NAME:dotted.key` in results/full/NAME/summary.json (a committed full run), or
# `bench/NAME:dotted.key` in benchmarks/results/NAME.json (a committed benchmark record; list
# items by index: `curved.0.c4_over_paper`). The cell's numbers and the keys pair up in
# order; each number must equal the key's value rounded to the digits the table shows.

RESULTS = ROOT / "results"
NUMBER = re.compile(r"[−-]?\d+(?:\.\d+)?(?:e[−-]?\d+)?")
SOURCE_PAGES = [ROOT / "README.md", ROOT / "docs" / "results.md", ROOT / "docs" / "scaling.md"]


def _table_rows(page: pathlib.Path):
    """``(page, measured_cell, source_cell)`` for each row of each table with a source column."""
    rows, header = [], None
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        # cells split on unescaped pipes; a key may hold a pipe written as \|
        inner = line.strip().removeprefix("|").removesuffix("|")
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line) <= set("|-: "):
            continue
        if "source" in header and "measured" in header:
            rows.append((page.name, cells[header.index("measured")], cells[header.index("source")]))
    return rows


def _lookup(ref: str):
    name, _, dotted = ref.partition(":")
    if name.startswith("bench/"):
        path = ROOT / "benchmarks" / "results" / f"{name.removeprefix('bench/')}.json"
    else:
        path = RESULTS / (name if name.startswith("full/") else f"quick/{name}") / "summary.json"
    data = json.loads(path.read_text())
    parts = dotted.split(".")
    while parts:  # a key may itself hold a dot (`..._tl_le_0.1`): take the longest that exists
        for k in range(len(parts), 0, -1):
            key = ".".join(parts[:k])
            if isinstance(data, list) and key.isdigit():
                data, parts = data[int(key)], parts[k:]
                break
            if isinstance(data, dict) and key in data:
                data, parts = data[key], parts[k:]
                break
        else:
            raise KeyError(f"{ref}: no key {parts[0]!r} in {path.relative_to(ROOT)}")
    return data


def _matches(shown: str, value: float) -> bool:
    shown = shown.replace("−", "-")
    if "e" in shown:
        mantissa = shown.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(f"{value:.{digits}e}") == float(shown)
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{digits}f}" == f"{float(shown):.{digits}f}"


def _source_rows():
    return [row for page in SOURCE_PAGES if page.exists() for row in _table_rows(page)]


def test_results_tables_have_sources():
    assert len(_source_rows()) >= 10  # the pattern finds the tables' rows


@pytest.mark.parametrize("page, measured, source", _source_rows(), ids=lambda x: str(x)[:40])
def test_results_numbers_are_in_committed_summaries(page, measured, source):
    refs = re.findall(r"`((?:full/|bench/)?[a-z][a-z0-9_.-]*:[\w./=|>+]+)`", source)
    numbers = NUMBER.findall(measured.replace(",", ""))
    assert refs and len(refs) == len(numbers), f"{page}: {measured!r} vs sources {refs}"
    for shown, ref in zip(numbers, refs, strict=True):
        value = _lookup(ref)
        assert _matches(shown, float(value)), f"{page}: {shown} shown, {ref} = {value}"


MD_REF = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def _md_refs():
    out = set()
    for page in PAGES:
        for ref in MD_REF.findall(page.read_text()):
            out.add((page.name, ref, page.parent.name))
    return sorted(out)


@pytest.mark.parametrize("page, ref, folder", _md_refs(), ids=lambda x: str(x))
def test_cited_markdown_pages_exist(page, ref, folder):
    here = ROOT / "docs" if folder == "docs" else ROOT
    found = (ROOT / ref).exists() or (here / ref).exists()
    assert found, f"{page} cites {ref}, which does not exist"
