"""Results on disk: atomic JSON files, JSON-lines logs, and sweeps that resume after a kill.

A results folder (one per experiment run) looks like::

    out_dir/
      config.json        the config that produced everything below (`RunDir.write_config`)
      units/<name>.json  one record per finished unit of work (`run_sweep`), with the environment
                         that computed it (`quartic.harness.provenance`)
      metrics.jsonl      per-step metrics, one JSON object a line (`append_jsonl`)
      summary.json       the fitted numbers the experiment reports (`RunDir.write_summary`)

Every file is written atomically (a temporary file in the same folder, fsync, `os.replace`), so a
reader, or a rerun after `kill -9`, sees either the old file or the new one, never half of one. A
sweep writes each unit's record as soon as that unit finishes and skips the units already on disk,
so rerunning the same command after an interruption recomputes only what was not finished. Units
must therefore not depend on one another or on the order they run in: each derives its randomness
from its own config (its seed), and the same seed gives the same numbers.

Per-step metrics appended to `metrics.jsonl` by a unit that was cut off are appended again when
the unit reruns: tag each record with its unit and keep the last occurrence, or write
`metrics.jsonl` once from the unit records (`write_jsonl_atomic`) when the sweep is done.

Files are JSON as Python writes it: a NaN or an infinity inside a recorded value (a failed unit's
partial results) is written as `NaN` / `Infinity`, which `read_json` reads back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from quartic.core.errors import DivergenceError, QuarticError
from quartic.harness import provenance
from quartic.harness.config import config_to_dict

__all__ = [
    "RunDir",
    "SweepResult",
    "append_jsonl",
    "nonfinite_paths",
    "read_json",
    "read_jsonl",
    "run_sweep",
    "to_jsonable",
    "unit_note",
    "write_json_atomic",
    "write_jsonl_atomic",
]

PathLike = str | os.PathLike

# Unit names become file names: keep them portable and visible (no leading dot, no separators).
_UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,199}$")


# --------------------------------------------------------------------------------------------------
# JSON files.


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data.

    Converts numpy and JAX scalars and arrays (anything with `__array__`) to numbers and nested
    lists, dataclasses to dicts, tuples to lists, paths to strings. Raises TypeError for anything
    else that JSON cannot hold.
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return config_to_dict(obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if hasattr(obj, "__array__"):
        import numpy as np

        array = np.asarray(obj)
        kind = array.dtype.kind
        if kind == "c":
            raise TypeError(f"cannot write complex values to JSON (dtype {array.dtype})")
        if kind in "US":
            return array.tolist()
        if kind == "O":
            return to_jsonable(array.tolist())
        if kind not in "biuf":
            # bfloat16 and friends come back as their own scalar type; JSON needs Python floats.
            array = array.astype(np.float64)
        return array.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    raise TypeError(f"cannot write a value of type {type(obj).__name__} to JSON")


def _fsync_dir(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: PathLike, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: leave no temporary file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 2) -> pathlib.Path:
    """Write `obj` (see `to_jsonable`) to `path` as JSON, atomically; returns the path.

    The text is serialised first, then written to a temporary file in the same folder, flushed,
    fsynced and renamed over `path` with `os.replace`: other readers never see a partial file, and a
    failure leaves the old file (if any) in place and no temporary file behind. Missing parent
    folders are created.
    """
    text = json.dumps(to_jsonable(obj), indent=indent) + "\n"
    return _write_text_atomic(path, text)


def read_json(path: PathLike) -> Any:
    """Read a JSON file. Raises FileNotFoundError if it is missing, QuarticError if corrupt."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QuarticError(f"{path} is not valid JSON ({e}); delete it to recompute it") from e


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append `record` as one JSON line to `path` (created with its folders if missing).

    The line is written with one `write` call on a line-buffered file and flushed, so after a
    kill at most the last line is incomplete; `read_jsonl` skips such a line.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record)) + "\n"
    with open(path, "a", buffering=1, encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: PathLike) -> list[Any]:
    """The records of a JSON-lines file; an incomplete last line (from a kill) is dropped.

    Raises FileNotFoundError if the file is missing and QuarticError if a line other than the last
    is corrupt.
    """
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise QuarticError(f"{path}:{i + 1} is not valid JSON ({e})") from e
    return records


def write_jsonl_atomic(path: PathLike, records: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    """Write all of `records` as a JSON-lines file, atomically (see `write_json_atomic`)."""
    text = "".join(json.dumps(to_jsonable(r)) + "\n" for r in records)
    return _write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------------
# A results folder.


class RunDir:
    """One run's results folder: `config.json`, `units/`, `metrics.jsonl`, `summary.json`.

    Creating a `RunDir` touches nothing on disk; the folder is made by the first write.
    """

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> pathlib.Path:
        return self.path / "config.json"

    @property
    def units_dir(self) -> pathlib.Path:
        return self.path / "units"

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> pathlib.Path:
        return self.path / "summary.json"

    def write_config(self, config: Any) -> pathlib.Path:
        """Record the config (a dataclass or a dict) in `config.json`.

        If `config.json` already exists it must hold the same config: results made with different
        settings must not be mixed by a resumed run. Raises QuarticError naming the keys that
        differ otherwise. A key the saved config lacks counts as the same when its value here is
        off (None, empty, zero or False): a knob added to the config after the run, left at its
        off value, which keeps the old behaviour. `config.json` keeps what the run was made with.
        """
        data = config_to_dict(config) if not isinstance(config, Mapping) else dict(config)
        data = json.loads(json.dumps(to_jsonable(data)))
        if self.config_path.exists():
            saved = read_json(self.config_path)
            diffs = [
                k for k in _diff_keys(saved, data) if _get(saved, k) != "<absent>" or _get(data, k)
            ]
            if diffs:
                shown = ", ".join(
                    f"{k}: {_get(saved, k)!r} -> {_get(data, k)!r}" for k in diffs[:5]
                ) + (", ..." if len(diffs) > 5 else "")
                raise QuarticError(
                    f"{self.path} holds results of a different config ({shown}); "
                    "pass another output folder (--out DIR) or delete it"
                )
            return self.config_path
        return write_json_atomic(self.config_path, data)

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config_path)

    def unit_path(self, name: str) -> pathlib.Path:
        _check_unit_name(name)
        return self.units_dir / f"{name}.json"

    def read_unit(self, name: str) -> dict[str, Any] | None:
        """The record of unit `name`, or None if it has not finished."""
        path = self.unit_path(name)
        try:
            record = read_json(path)
        except FileNotFoundError:
            return None
        if not isinstance(record, dict) or record.get("status") not in ("done", "failed"):
            raise QuarticError(
                f"{path} is not a unit record (no status done/failed); delete it to recompute it"
            )
        return record

    def write_unit(self, name: str, record: Mapping[str, Any]) -> pathlib.Path:
        return write_json_atomic(self.unit_path(name), record)

    def units(self) -> dict[str, dict[str, Any]]:
        """Every unit record on disk, by name (sorted)."""
        if not self.units_dir.is_dir():
            return {}
        names = sorted(p.stem for p in self.units_dir.glob("*.json") if _UNIT_NAME.match(p.stem))
        return {name: self.read_unit(name) for name in names}

    def done_results(self) -> dict[str, Any]:
        """The ``result`` of every finished unit, by name (what a ``plot`` reads back)."""
        return {k: r["result"] for k, r in self.units().items() if r.get("status") == "done"}

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[Any]:
        return read_jsonl(self.metrics_path)

    def write_summary(self, summary: Mapping[str, Any]) -> pathlib.Path:
        return write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary_path)


def _check_unit_name(name: str) -> None:
    if not isinstance(name, str) or not _UNIT_NAME.match(name):
        raise QuarticError(
            f"unit name {name!r} cannot be a file name: use letters, digits and _ . , = + - "
            "(not first), at most 200 characters"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                out.append(prefix + k)
            else:
                out.extend(_diff_keys(a[k], b[k], f"{prefix}{k}."))
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return "<absent>"
        data = data[part]
    return data


# --------------------------------------------------------------------------------------------------
# Sweeps.


def nonfinite_paths(obj: Any, prefix: str = "") -> list[str]:
    """Where `obj` (JSON data) holds a NaN or an infinity, as paths like `loss` or `curve[3]`."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "<value>"]
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out.extend(nonfinite_paths(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out.extend(nonfinite_paths(v, f"{prefix}[{i}]"))
        return out
    return []


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What `run_sweep` found and did.

    Attributes:
      records: every unit's record by name, in the order the units were given:
        `{"name", "status": "done", "result", "seconds"}` or
        `{"name", "status": "failed", "reason", "partial", "seconds"}`.
      computed: how many units ran in this call.
      skipped: how many were already on disk and did not run.
      failed: how many of all the units are recorded as failed (in this call or before).
    """

    records: dict[str, dict[str, Any]]
    computed: int
    skipped: int
    failed: int

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        """The returned dict of every unit that finished, by name."""
        return {k: r["result"] for k, r in self.records.items() if r["status"] == "done"}

    @property
    def failures(self) -> dict[str, str]:
        """The reason of every failed unit, by name."""
        return {k: r["reason"] for k, r in self.records.items() if r["status"] == "failed"}


class _Progress:
    """A tqdm bar with ETA on a terminal; otherwise one plain line per unit on stderr."""

    def __init__(self, desc: str, total: int, skipped: int, out_dir: pathlib.Path):
        self.desc, self.total, self.done = desc, total, skipped
        self.todo = total - skipped
        self.seconds = 0.0
        self.computed = 0
        self.stream = sys.stderr
        self.bar = None
        if skipped:
            self._line(f"{skipped} of {total} units already in {out_dir}, skipping them")
        if self.todo and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=skipped, desc=desc, unit="unit", file=self.stream,
                dynamic_ncols=True,
            )  # fmt: skip

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{self.desc}: {text}", file=self.stream)
        else:
            print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def unit(self, name: str, seconds: float, record: Mapping[str, Any]) -> None:
        self.done += 1
        self.computed += 1
        self.seconds += seconds
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(1)
            if record["status"] == "failed":
                self._line(f"{name} failed: {record['reason']}")
            return
        eta = self.seconds / self.computed * (self.todo - self.computed)
        status = "done" if record["status"] == "done" else f"FAILED ({record['reason']})"
        self._line(
            f"[{self.done}/{self.total}] {name} {status} in {seconds:.2f} s, eta {_fmt_s(eta)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_ACTIVE: list[tuple[_Progress, str]] = []  # the sweep's progress and the unit now running


def unit_note(text: str) -> None:
    """One line of progress from inside a long unit (a stage finished, with its time), as
    ``desc: unit: text`` beside the sweep's own lines; outside :func:`run_sweep`, plain stderr."""
    if _ACTIVE:
        progress, name = _ACTIVE[-1]
        progress._line(f"{name}: {text}")
    else:
        print(text, file=sys.stderr, flush=True)


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run_sweep(
    units: Sequence[tuple[str, Callable[[], Mapping[str, Any]]]]
    | Mapping[str, Callable[[], Mapping[str, Any]]],
    out_dir: PathLike,
    *,
    desc: str | None = None,
) -> SweepResult:
    """Run named units of work, each saved to `out_dir/units/<name>.json` as soon as it finishes.

    A unit whose file already exists (status done or failed) is skipped, so rerunning after an
    interruption computes only the rest. A unit that raises `DivergenceError`, or returns a
    non-finite number anywhere in its result, is recorded as failed (with the reason and whatever
    partial results it had) and the sweep goes on. Any other exception propagates; every unit
    finished before it is already on disk.

    Args:
      units: `(name, fn)` pairs (or a mapping name -> fn) in the order to run them; `fn()` returns a
        JSON-able mapping (numpy and JAX numbers are fine). Names must be unique and usable as file
        names. Units must not depend on each other or on the order they run in.
      out_dir: the run's results folder (created if missing).
      desc: the label of the progress bar and log lines; defaults to the folder's name.

    Returns:
      A `SweepResult`: every record by name, and how many units were computed, skipped and failed.
      Each record also names the environment that computed it (`provenance.environment`: versions,
      device, CPU model and instruction set), since float32 results differ between CPUs.
    """
    items = list(units.items()) if isinstance(units, Mapping) else list(units)
    names = [name for name, _ in items]
    for name in names:
        _check_unit_name(name)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise QuarticError(f"unit names must be unique; repeated: {', '.join(dup)}")

    run_dir = RunDir(out_dir)
    run_dir.units_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        record = run_dir.read_unit(name)
        if record is not None:
            records[name] = record
    skipped = len(records)

    progress = _Progress(desc or run_dir.path.name, len(items), skipped, run_dir.path)
    try:
        for name, fn in items:
            if name in records:
                continue
            start = time.perf_counter()
            _ACTIVE.append((progress, name))
            try:
                result = fn()
            except DivergenceError as e:
                record = {"status": "failed", "reason": str(e), "partial": to_jsonable(e.partial)}
            else:
                if not isinstance(result, Mapping):
                    raise TypeError(
                        f"unit {name!r} returned {type(result).__name__}; units return a dict"
                    )
                result = to_jsonable(result)
                bad = nonfinite_paths(result)
                if bad:
                    shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
                    reason = f"non-finite values at {shown}"
                    record = {"status": "failed", "reason": reason, "partial": result}
                else:
                    record = {"status": "done", "result": result}
            finally:
                _ACTIVE.pop()
            seconds = time.perf_counter() - start
            record = {"name": name, **record, "seconds": seconds,
                      "environment": provenance.environment()}  # fmt: skip
            run_dir.write_unit(name, record)
            records[name] = record
            progress.unit(name, seconds, record)
    finally:
        progress.close()

    ordered = {name: records[name] for name in names}
    failed = sum(r["status"] == "failed" for r in ordered.values())
    return SweepResult(ordered, computed=len(ordered) - skipped, skipped=skipped, failed=failed)
