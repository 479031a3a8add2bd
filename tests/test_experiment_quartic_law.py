"""Smoke test of experiments/quartic_law.py: small run, its JSON, its figure, resume."""

import pathlib

import pytest

from quartic.harness import cli
from quartic.harness.runs import read_json


@pytest.mark.slow
def test_quartic_law_smoke(tmp_path: pathlib.Path):
    out, figs = tmp_path / "out", tmp_path / "figs"
    args = ["run", "quartic_law", "--quick", "--out", str(out), "--figures", str(figs)]
    overrides = [
        "--set",
        "num_seeds=2",
        "--set",
        "num_curved=1",
        "--set",
        "num_times=24",
        "--set",
        "n=16",
        "--set",
        "d=2",
    ]
    assert cli.main(args + overrides) == 0
    summary = read_json(out / "summary.json")
    assert summary["num_quadratic"] == 2 and summary["num_failed"] == 0
    assert abs(summary["exponent_flow"]["mean"] - 4) < 0.01
    assert abs(summary["exponent_gd"]["mean"] - 4) < 0.05
    # the ladder's slopes are checked once, in tests/test_ladder.py; here only that it is reported
    assert summary["ladder"]["phg_zero"]["predicted"] == 6
    assert isinstance(summary["ladder"]["phg_zero"]["measured"], float)
    assert summary["curved"][0]["onset_order"] == 4
    assert abs(summary["curved"][0]["ratio_to_c4_smallest_t"] - 1) < 1e-3
    assert (figs / "quartic_law.png").stat().st_size > 10_000
    # a rerun resumes: every unit is skipped, the files are untouched
    unit = out / "units" / "quadratic_000.json"
    before = unit.stat().st_mtime_ns
    assert cli.main(args + overrides) == 0
    assert unit.stat().st_mtime_ns == before
