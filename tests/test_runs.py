"""Results on disk: atomic JSON writes, JSON lines, config records and resumable sweeps."""

import io
import json
import math
import os
import pathlib
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from quartic.core.errors import DivergenceError, QuarticError
from quartic.harness import runs
from quartic.harness.runs import (
    RunDir,
    append_jsonl,
    read_json,
    read_jsonl,
    run_sweep,
    to_jsonable,
    write_json_atomic,
)

# --------------------------------------------------------------------------------------------------
# JSON files.


def test_write_json_round_trips_numpy_and_jax_values(tmp_path):
    obj = {
        "f32": np.float32(0.5),
        "i64": np.int64(7),
        "b": np.bool_(True),
        "arr": np.arange(6, dtype=np.float64).reshape(2, 3),
        "jax_scalar": jnp.asarray(1.25),
        "jax_arr": jnp.arange(3),
        "bf16": jnp.asarray([1.5], dtype=jnp.bfloat16),
        "tuple": (1, 2.5, "x"),
        "path": pathlib.Path("a/b"),
        "nan": float("nan"),
    }
    path = write_json_atomic(tmp_path / "sub" / "x.json", obj)
    back = read_json(path)
    assert back["f32"] == 0.5 and type(back["f32"]) is float
    assert back["i64"] == 7 and type(back["i64"]) is int
    assert back["b"] is True
    assert back["arr"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert back["jax_scalar"] == 1.25
    assert back["jax_arr"] == [0, 1, 2]
    assert back["bf16"] == [1.5]
    assert back["tuple"] == [1, 2.5, "x"]
    assert back["path"] == "a/b"
    assert math.isnan(back["nan"])


def test_to_jsonable_rejects_what_json_cannot_hold():
    with pytest.raises(TypeError, match="set"):
        to_jsonable({"x": {1, 2}})
    with pytest.raises(TypeError, match="complex"):
        to_jsonable(np.array([1j]))


def test_write_json_never_shows_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    seen = []
    real_fsync = os.fsync

    def spying_fsync(fd):
        # At fsync time the data is complete in a temporary file; the target is not there yet.
        if not path.exists():
            temps = [p.name for p in tmp_path.iterdir()]
            seen.append(temps)
        return real_fsync(fd)

    monkeypatch.setattr(runs.os, "fsync", spying_fsync)
    write_json_atomic(path, {"a": 1})
    assert seen and len(seen[0]) == 1 and seen[0][0].startswith(".x.json.")
    assert seen[0][0].endswith(".tmp")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_json_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "x.json", {"version": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"version": 2})
    monkeypatch.undo()
    # Serialisation errors happen before any file is opened.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"version": object()})
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_read_json_reports_a_corrupt_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(QuarticError, match="bad.json is not valid JSON"):
        read_json(bad)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_append_jsonl_and_a_truncated_last_line(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    for step in range(3):
        append_jsonl(path, {"step": step, "loss": np.float32(0.5) * step})
    assert read_jsonl(path) == [{"step": s, "loss": 0.5 * s} for s in range(3)]
    # A kill in the middle of a write leaves at most the last line incomplete.
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(QuarticError, match="metrics.jsonl:2"):
        read_jsonl(path)


def test_rundir_refuses_to_mix_configs(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config({"lr": 0.1, "model": {"width": 8}, "ts": (1, 2)})
    # The same config again (tuples saved as lists) is fine: that is a resume.
    run_dir.write_config({"lr": 0.1, "model": {"width": 8}, "ts": [1, 2]})
    with pytest.raises(QuarticError, match=r"different config \(model.width: 8 -> 16\)"):
        run_dir.write_config({"lr": 0.1, "model": {"width": 16}, "ts": [1, 2]})
    assert run_dir.read_config() == {"lr": 0.1, "model": {"width": 8}, "ts": [1, 2]}
    # a knob added since, at its off value (None, empty), resumes; set to something, it does not
    run_dir.write_config({"lr": 0.1, "model": {"width": 8}, "ts": [1, 2], "pool": [], "x": None})
    with pytest.raises(QuarticError, match=r"different config \(x: '<absent>' -> 0.5\)"):
        run_dir.write_config({"lr": 0.1, "model": {"width": 8}, "ts": [1, 2], "x": 0.5})
    assert run_dir.read_config() == {"lr": 0.1, "model": {"width": 8}, "ts": [1, 2]}


# --------------------------------------------------------------------------------------------------
# Sweeps.


def _units(calls, values):
    def make(name, value):
        def fn():
            calls.append(name)
            return {"value": value, "array": np.full(2, value)}

        return fn

    return [(name, make(name, v)) for name, v in values.items()]


def test_sweep_runs_every_unit_and_records_it(tmp_path, capsys):
    calls = []
    sweep = run_sweep(_units(calls, {"a": 1.0, "b": 2.0, "c": 3.0}), tmp_path, desc="demo")
    assert calls == ["a", "b", "c"]
    assert (sweep.computed, sweep.skipped, sweep.failed) == (3, 0, 0)
    assert sweep.results == {
        k: {"value": v, "array": [v, v]} for k, v in zip("abc", [1, 2, 3], strict=True)
    }
    on_disk = RunDir(tmp_path).units()
    assert list(on_disk) == ["a", "b", "c"]
    assert on_disk["b"]["status"] == "done" and on_disk["b"]["result"]["value"] == 2.0
    assert on_disk["b"]["seconds"] >= 0
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 3 and log[0].startswith("demo: [1/3] a done") and "eta" in log[0]


def test_unit_notes_name_their_unit_and_stop_with_it(tmp_path, capsys):
    from quartic.harness.runs import unit_note

    def unit():
        unit_note("stage one took 1.0 s")
        return {"value": 1.0}

    def failing():
        unit_note("stage one took 2.0 s")
        raise DivergenceError("diverged", partial={})

    run_sweep([("first", unit), ("second", failing)], tmp_path, desc="demo")
    unit_note("after the sweep")
    log = capsys.readouterr().err.splitlines()
    assert log[0] == "demo: first: stage one took 1.0 s"
    assert log[1].startswith("demo: [1/2] first done")
    assert log[2] == "demo: second: stage one took 2.0 s"
    assert log[-1] == "after the sweep"  # outside a sweep: plain, no unit named


def test_sweep_skips_finished_units(tmp_path, capsys):
    calls = []
    run_sweep(_units(calls, {"a": 1.0, "b": 2.0}), tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "units").iterdir()}
    calls.clear()
    sweep = run_sweep(_units(calls, {"a": 1.0, "b": 2.0, "c": 3.0}), tmp_path)
    assert calls == ["c"]
    assert (sweep.computed, sweep.skipped) == (1, 2)
    assert list(sweep.results) == ["a", "b", "c"]
    for name, mtime in mtimes.items():
        assert (tmp_path / "units" / name).stat().st_mtime_ns == mtime
    assert "2 of 3 units already in" in capsys.readouterr().err


def test_sweep_records_divergence_and_nan_then_continues(tmp_path):
    calls = []

    def diverges():
        calls.append("diverges")
        raise DivergenceError("loss became inf at step 12", partial={"losses": [1.0, 3.0]})

    def returns_nan():
        calls.append("nan")
        return {"loss": 1.0, "curve": [0.5, float("nan")], "inner": {"x": np.float32(np.inf)}}

    units = [
        *_units(calls, {"first": 1.0}),
        ("diverges", diverges),
        ("nan", returns_nan),
        *_units(calls, {"last": 2.0}),
    ]
    sweep = run_sweep(units, tmp_path)
    assert calls == ["first", "diverges", "nan", "last"]
    assert (sweep.computed, sweep.failed) == (4, 2)
    assert sweep.failures == {
        "diverges": "loss became inf at step 12",
        "nan": "non-finite values at curve[1], inner.x",
    }
    assert list(sweep.results) == ["first", "last"]
    diverged = read_json(tmp_path / "units" / "diverges.json")
    assert diverged["status"] == "failed" and diverged["partial"] == {"losses": [1.0, 3.0]}
    assert read_json(tmp_path / "units" / "nan.json")["partial"]["loss"] == 1.0
    # Failed units are recorded results too: a rerun does not retry them.
    calls.clear()
    again = run_sweep(units, tmp_path)
    assert calls == [] and (again.skipped, again.failed) == (4, 2)


def test_sweep_other_errors_propagate_with_earlier_units_saved(tmp_path):
    calls = []

    def broken():
        raise RuntimeError("bug in unit")

    units = [*_units(calls, {"a": 1.0}), ("broken", broken), *_units(calls, {"c": 3.0})]
    with pytest.raises(RuntimeError, match="bug in unit"):
        run_sweep(units, tmp_path)
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["a.json"]
    calls.clear()
    units[1] = ("broken", lambda: {"fixed": True})
    sweep = run_sweep(units, tmp_path)
    assert calls == ["c"] and sweep.skipped == 1 and sweep.results["broken"] == {"fixed": True}


def test_sweep_rejects_bad_units(tmp_path):
    with pytest.raises(ValueError, match="repeated: a"):
        run_sweep([("a", dict), ("a", dict)], tmp_path)
    with pytest.raises(ValueError, match="cannot be a file name"):
        run_sweep([("../escape", dict)], tmp_path)
    with pytest.raises(TypeError, match="returned float"):
        run_sweep([("x", lambda: 1.0)], tmp_path)
    (tmp_path / "units" / "y.json").write_text(json.dumps({"value": 1}))
    with pytest.raises(QuarticError, match="y.json is not a unit record"):
        run_sweep([("y", dict)], tmp_path)


def test_sweep_same_numbers_with_a_progress_bar(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def unit(seed):
        return lambda: {"x": float(np.random.default_rng(seed).standard_normal())}

    units = [(f"s{seed}", unit(seed)) for seed in range(3)]
    plain = run_sweep(units, tmp_path / "plain").results
    terminal = Terminal()
    monkeypatch.setattr(runs.sys, "stderr", terminal)
    barred = run_sweep(units, tmp_path / "bar", desc="bar").results
    assert barred == plain
    assert "3/3" in terminal.getvalue()


def test_divergence_error_keeps_partial_results_across_pickling():
    error = DivergenceError("lr too large", partial={"losses": [1.0, 4.0]})
    assert isinstance(error, QuarticError) and isinstance(error, ValueError)
    back = pickle.loads(pickle.dumps(error))
    assert str(back) == "lr too large" and back.partial == {"losses": [1.0, 4.0]}
    assert DivergenceError("x").partial == {}


def test_each_unit_record_names_the_environment_that_computed_it(tmp_path, monkeypatch):
    """Float32 results differ between CPUs (quartic.harness.provenance), so every unit record says
    where it was computed; a resumed run on other settings shows as a second environment."""
    import jax

    from quartic.harness import provenance

    run_sweep(_units([], {"a": 1.0}), tmp_path)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")  # read per unit, not per process
    run_sweep(_units([], {"a": 1.0, "b": 2.0}), tmp_path)  # resumes: only b runs here
    units = RunDir(tmp_path).units()
    first, second = units["a"]["environment"], units["b"]["environment"]
    assert second["xla_flags"] == "--xla_cpu_max_isa=AVX2" != first["xla_flags"]
    assert {k: v for k, v in first.items() if k != "xla_flags"} == {
        k: v for k, v in second.items() if k != "xla_flags"
    }
    assert (first["jax"], first["backend"]) == (jax.__version__, jax.default_backend())
    assert first["cpu_count"] == os.cpu_count() and first["device_count"] == len(jax.devices())
    assert provenance.summary_environments(units) == [
        {"environment": first, "units": ["a"]},
        {"environment": second, "units": ["b"]},
    ]
    old = {"a": {"status": "done"}, "b": units["b"]}  # a record written before environments
    assert provenance.summary_environments(old)[0] == {"environment": None, "units": ["a"]}
