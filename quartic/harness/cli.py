"""The `quartic` command: list, run and reproduce the paper's experiments, redraw their figures.

Usage::

    quartic list [--all]
    quartic run NAME [--quick] [--set key=value ...] [--out DIR] [--figures DIR]
    quartic reproduce [--full] [--only NAME,...] [--out DIR] [--figures DIR]
    quartic figures [--full] [--only NAME,...] [--out DIR] [--figures DIR]
    quartic diagnose ...            (`quartic.harness.diagnose_command`)

`python -m quartic.harness.cli ...` is the same command. Results go to `results/NAME` (`results/quick/NAME`
with `--quick`), relative to the current folder; an interrupted run (Ctrl-C, `kill -9`, a crash)
keeps everything it finished, and rerunning the same command resumes where it stopped. A rerun with
a different config into the same folder is refused, so results of two configs are never mixed. Bad
input (an unknown experiment, a bad `--set`, a missing file) is reported as one line
`quartic: error: ...` with a non-zero exit code; Ctrl-C exits with 130.

Experiment protocol
-------------------
Each experiment is one script `experiments/NAME.py` in the repository (one per figure or table of
the papers). The folder is installed with the package as `quartic.experiments` (by `pip install .`
as by `pip install -e .`), where the command finds the scripts (the environment variable
`QUARTIC_EXPERIMENTS_DIR` points elsewhere) and loads each by its file path. Names starting with
`_` are hidden from `quartic list` and `quartic reproduce` but can be run by name. A script defines:

`Config`
    A frozen dataclass whose defaults are the full run, with a classmethod `quick()` returning the
    quick-scale config that `quartic reproduce` and `--quick` use. `--set key=value` overrides a
    field (see `quartic.harness.config` for the accepted types; nested dataclasses take dotted keys).

`run(config, out_dir: pathlib.Path) -> dict`
    Does the work, writing results into `out_dir` as it goes: `config.json`
    (`quartic.harness.runs.RunDir(out_dir).write_config(config)`), one file per unit of work
    (`quartic.harness.runs.run_sweep`), per-step `metrics.jsonl` and `summary.json`; returns the summary
    dict. It must resume when `out_dir` already holds finished units (`run_sweep` skips them), and
    must derive all randomness from the config, so that the same seed gives the same numbers
    whether or not the run was interrupted. The command writes `config.json` before calling it.
    A unit that diverges raises `quartic.core.errors.DivergenceError` (`run_sweep` records it as failed
    and goes on); one that escapes `run` is reported in one line, its `partial` results saved to
    `out_dir/partial.json`. Bad input raises `quartic.core.errors.QuarticError` (one line, exit 2).

`plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]`
    Draws the figures from the files in `out_dir` only (no recomputation) into `fig_dir` and returns
    their paths.

`TITLE: str` (optional)
    One line shown by `quartic list` (default: the first line of the module docstring).

`QUICK_SECONDS: float` (optional)
    The expected wall time of the quick run on a 2-core CPU, shown by `quartic list`.

`table(summary: dict) -> list[dict]` (optional)
    Rows `{"experiment", "quantity", "theory", "measured", "verdict"}` for the table that
    `quartic reproduce` prints and writes to `<out>/summary.md` and `<out>/summary.json`.

and ends with::

    if __name__ == "__main__":
        raise SystemExit(quartic.harness.cli.main(["run", "NAME", *sys.argv[1:]]))

so that `python experiments/NAME.py --quick --set seed=1` works.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from quartic.core import cache
from quartic.core.errors import DivergenceError, QuarticError
from quartic.harness import compile_cache, diagnose_command, provenance
from quartic.harness.config import apply_overrides
from quartic.harness.runs import RunDir, _fmt_s, write_json_atomic

__all__ = [
    "ORDER",
    "discover",
    "experiments_dir",
    "format_table",
    "load_experiment",
    "main",
    "ordered_names",
    "run_experiment",
]

# The order of `quartic reproduce`: the papers' order. Experiments not listed run after these,
# alphabetically; listed names that do not exist are skipped.
ORDER = (
    "quartic_law",
    "transformer_collapse",
    "ablation_ladder",
    "optimisers",
    "defences",
    "forecast",
    "transfer_robustness",
)

EXPERIMENTS_ENV = "QUARTIC_EXPERIMENTS_DIR"
TABLE_COLUMNS = ("experiment", "quantity", "theory", "measured", "verdict")


# --------------------------------------------------------------------------------------------------
# Finding and loading experiments.


def experiments_dir() -> pathlib.Path:
    """The folder of experiment scripts: `$QUARTIC_EXPERIMENTS_DIR`, else the installed
    `quartic.experiments` package (the repository's `experiments/`, installed under that name by
    `pip install .` or `pip install -e .`).

    Raises QuarticError if it does not exist.
    """
    env = os.environ.get(EXPERIMENTS_ENV)
    if env:
        folder = pathlib.Path(env)
    else:
        spec = importlib.util.find_spec("quartic.experiments")
        locations = list(spec.submodule_search_locations or []) if spec else []
        folder = pathlib.Path(locations[0]) if locations else pathlib.Path("experiments")
    if not folder.is_dir():
        raise QuarticError(
            f"no experiments folder at {folder}: reinstall quartic (pip install .) so that its "
            f"experiments are installed with it, or set {EXPERIMENTS_ENV}"
        )
    return folder


def discover(include_hidden: bool = False) -> dict[str, pathlib.Path]:
    """Experiment name -> script path, sorted by name; `_`-prefixed names only if asked."""
    found = {}
    for path in sorted(experiments_dir().glob("*.py")):
        name = path.stem
        if name == "__init__" or (name.startswith("_") and not include_hidden):
            continue
        found[name] = path
    return found


def ordered_names(names: Iterable[str]) -> list[str]:
    """`names` in reproduce order: those in `ORDER` first, in that order, then the rest sorted."""
    names = set(names)
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def _unknown_experiment(name: str) -> QuarticError:
    known = list(discover())
    listing = f"known experiments: {', '.join(known)}" if known else "no experiments exist yet"
    return QuarticError(f"unknown experiment {name!r} in {experiments_dir()}; {listing}")


def load_experiment(name: str) -> ModuleType:
    """Load `experiments/NAME.py` by file path and check that it follows the protocol.

    `name` may also be given as `NAME.py` or a path to the script. Raises QuarticError for an
    unknown experiment (listing the known ones) or a script that lacks `Config`, `run` or `plot`.
    """
    if name.endswith(".py"):
        name = pathlib.Path(name).stem
    path = experiments_dir() / f"{name}.py"
    if not name or "/" in name or not path.is_file():
        raise _unknown_experiment(name)
    module_name = f"quartic_experiment_{name}"
    module = sys.modules.get(module_name)
    if module is None or pathlib.Path(getattr(module, "__file__", "")) != path:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        # Registered before running it: dataclasses and typing.get_type_hints look the module up.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    missing = [attr for attr in ("Config", "run", "plot") if not hasattr(module, attr)]
    config_cls = getattr(module, "Config", None)
    if config_cls is not None and not (
        isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)
    ):
        missing.append("Config as a dataclass")
    elif config_cls is not None and not callable(getattr(config_cls, "quick", None)):
        missing.append("Config.quick()")
    if missing:
        raise QuarticError(
            f"{path} does not follow the experiment protocol (see `quartic.harness.cli`): "
            f"it lacks {', '.join(missing)}"
        )
    return module


def _title(module: ModuleType) -> str:
    title = getattr(module, "TITLE", None)
    if not title and module.__doc__:
        title = module.__doc__.strip().splitlines()[0]
    return title or ""


# --------------------------------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class _Context:
    """What the Ctrl-C message needs to know: the folder being written."""

    out_dir: pathlib.Path | None = None


def _default_out(name: str, quick: bool) -> pathlib.Path:
    return pathlib.Path("results") / ("quick" if quick else "") / name


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None,
    _ctx: _Context | None = None,
) -> tuple[ModuleType, dict[str, Any], pathlib.Path]:
    """Run one experiment (resuming whatever is in `out_dir`); returns (module, summary, out_dir).

    The config is `Config.quick()` if `quick` else `Config()`, then `overrides` (`key=value`). The
    default `out_dir` is `results/NAME` or `results/quick/NAME`. Raises QuarticError if `out_dir`
    holds results of a different config.
    """
    module = load_experiment(name)
    name = pathlib.Path(module.__file__).stem
    config = module.Config.quick() if quick else module.Config()
    config = apply_overrides(config, overrides)
    out = pathlib.Path(out_dir) if out_dir is not None else _default_out(name, quick)
    run_dir = RunDir(out)
    # a summary with no config.json beside it (the repository's committed quick results): the
    # config check of write_config cannot compare, and a changed config would overwrite it
    if (
        overrides
        and out_dir is None
        and run_dir.summary_path.exists()
        and not run_dir.config_path.exists()
    ):
        raise QuarticError(
            f"{out} holds a summary of a run whose config is not recorded (the repository's "
            f"committed results); a run with --set overrides would overwrite it: pass --out DIR"
        )
    if _ctx is not None:
        _ctx.out_dir = out
    run_dir.write_config(config)
    try:
        summary = module.run(config, out)
    except DivergenceError as e:
        if e.partial:
            write_json_atomic(out / "partial.json", e.partial)
            raise DivergenceError(
                f"{e} (partial results in {out / 'partial.json'})", e.partial
            ) from e
        raise
    if summary is None and run_dir.summary_path.exists():
        summary = run_dir.read_summary()
    if run_dir.summary_path.exists():  # which machines computed the units (provenance's docstring)
        environments = _environments(run_dir)
        run_dir.write_summary({**run_dir.read_summary(), "environments": environments})
        summary = {**(summary or {}), "environments": environments}
    return module, dict(summary or {}), out


def _environments(run_dir: RunDir) -> list[dict[str, Any]]:
    """The environments that computed the run's units, or this one for a run without units."""
    found = provenance.summary_environments(run_dir.units())
    return found or [{"environment": provenance.environment(), "units": []}]


def _results_root(out: str | None, quick: bool) -> pathlib.Path:
    if out:
        return pathlib.Path(out)
    return pathlib.Path("results", "quick") if quick else pathlib.Path("results")


def _plot(module: ModuleType, out: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    return [pathlib.Path(p) for p in (module.plot(out, fig_dir) or [])]


def _rows(name: str, module: ModuleType, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    if not hasattr(module, "table"):
        return []
    rows = []
    for row in module.table(summary):
        row = dict(row)
        row.setdefault("experiment", name)
        rows.append({k: row.get(k) for k in TABLE_COLUMNS})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table with the columns of `TABLE_COLUMNS`."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _split_only(only: str | None) -> list[str] | None:
    if only is None:
        return None
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        raise QuarticError("--only needs a comma list of experiment names")
    return names


def _selected(only: str | None) -> list[str]:
    names = _split_only(only)
    if names is None:
        return ordered_names(discover())
    for name in names:
        if not (experiments_dir() / f"{name}.py").is_file():
            raise _unknown_experiment(name)
    return names


# --------------------------------------------------------------------------------------------------
# Subcommands.


def _cmd_list(args: argparse.Namespace, ctx: _Context) -> int:
    names = ordered_names(discover(include_hidden=args.all))
    if not names:
        print(f"no experiments in {experiments_dir()}")
        return 0
    width = max(len(n) for n in names)
    print(f"{'NAME':<{width}}  {'QUICK':>8}  TITLE")
    for name in names:
        try:
            module = load_experiment(name)
        except Exception as e:  # one broken script must not hide the others
            print(f"{name:<{width}}  {'?':>8}  (cannot load: {type(e).__name__}: {e})")
            continue
        seconds = getattr(module, "QUICK_SECONDS", None)
        estimate = f"~{_fmt_s(float(seconds))}" if seconds is not None else "?"
        print(f"{name:<{width}}  {estimate:>8}  {_title(module)}")
    return 0


def _cmd_run(args: argparse.Namespace, ctx: _Context) -> int:
    with compile_cache.CompileClock() as clock:
        module, summary, out = run_experiment(
            args.name, quick=args.quick, overrides=args.set, out_dir=args.out, _ctx=ctx
        )
    name = pathlib.Path(module.__file__).stem
    print(
        f"{name}: finished in {_fmt_s(clock.wall)} ({clock.share:.0%} compiling); results in {out}"
    )
    if args.figures is not None:
        for path in _plot(module, out, pathlib.Path(args.figures)):
            print(f"figure: {path}")
    rows = _rows(name, module, summary)
    if rows:
        print(format_table(rows))
    else:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_reproduce(args: argparse.Namespace, ctx: _Context) -> int:
    quick = not args.full
    names = _selected(args.only)
    if not names:
        raise QuarticError(f"no experiments to reproduce in {experiments_dir()}")
    out_root = _results_root(args.out, quick)
    fig_dir = pathlib.Path(args.figures)
    mode = "quick" if quick else "full"
    rows: list[dict[str, Any]] = []
    report: list[dict[str, Any]] = []
    start_all = time.perf_counter()
    # Each experiment starts with the process's float64 setting as `quartic run NAME` would find
    # it: one that enables x64 (the collapse study) must not change the next one's arithmetic
    # (the transfer study, float32, gave other numbers after it).
    import jax

    x64_at_start = bool(jax.config.jax_enable_x64)
    if quick and not args.only:
        # an experiment whose quick run does not yet fit the quick budget says so with
        # `IN_QUICK_REPRODUCE = False`; it still runs with `--only NAME` or `--full`
        slow = [n for n in names if not getattr(load_experiment(n), "IN_QUICK_REPRODUCE", True)]
        for n in slow:
            print(
                f"quartic: {n} is left out of the quick reproduce; run it with --only {n}",
                file=sys.stderr,
            )
        names = [n for n in names if n not in slow]
    for i, name in enumerate(names, 1):
        print(f"== [{i}/{len(names)}] {name} ({mode}) -> {out_root / name}", file=sys.stderr)
        jax.config.update("jax_enable_x64", x64_at_start)
        entry: dict[str, Any] = {"name": name, "out_dir": str(out_root / name)}
        with compile_cache.CompileClock() as clock:
            try:
                module, summary, out = run_experiment(
                    name, quick=quick, out_dir=out_root / name, _ctx=ctx
                )
                figures = _plot(module, out, fig_dir)
                new_rows = _rows(name, module, summary)
                entry.update(status="done", figures=[str(p) for p in figures], rows=len(new_rows))
            except QuarticError as e:
                # Bad input or a divergence in one experiment: report it and go on with the others.
                print(f"quartic: error: {name}: {e}", file=sys.stderr)
                new_rows = [dict(experiment=name, quantity="(run failed)", verdict=f"error: {e}")]
                new_rows = [{k: r.get(k) for k in TABLE_COLUMNS} for r in new_rows]
                entry.update(status="error", error=str(e))
        entry["seconds"], entry["compile_seconds"] = clock.wall, clock.compile
        entry["peak_rss_mb"] = _peak_rss_mb()  # the process's peak so far
        rows.extend(new_rows)
        report.append(entry)
        # Experiments share no compiled program: release them (and the data their closures hold)
        # before the next one, so the process's peak is one experiment's, not their sum.
        cache.clear_all()
        gc.collect()

    total = time.perf_counter() - start_all
    table = format_table(rows)
    no_table = [e["name"] for e in report if e["status"] == "done" and not e["rows"]]
    ran = ", ".join(
        f"{e['name']} ({_fmt_s(e['seconds'])}, {e['compile_seconds'] / e['seconds']:.0%} compiling, "
        f"{e['status']})"
        for e in report
    )
    md = [f"# quartic reproduce ({mode})", "", table, "", f"Ran: {ran}; total {_fmt_s(total)}."]
    if no_table:
        md.append(f"No table rows from: {', '.join(no_table)}.")
    out_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out_root / "summary.json",
        {"mode": mode, "seconds": total, "experiments": report, "rows": rows},
    )
    (out_root / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(table)
    print(f"\n{ran}; total {_fmt_s(total)}")
    print(f"summary: {out_root / 'summary.md'}; figures: {fig_dir}")
    return 1 if any(e["status"] == "error" for e in report) else 0


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def _cmd_figures(args: argparse.Namespace, ctx: _Context) -> int:
    out_root = _results_root(args.out, not args.full)
    if not out_root.is_dir():
        raise QuarticError(
            f"no results folder {out_root}; run `quartic reproduce` (or `quartic run NAME`) first"
        )
    only = _split_only(args.only)
    names = _selected(args.only)
    fig_dir = pathlib.Path(args.figures)
    drawn = 0
    for name in names:
        out = out_root / name
        if not out.is_dir():
            if only is not None:
                raise QuarticError(
                    f"no results for {name} in {out}; run `quartic run {name}` first"
                )
            print(f"quartic: no results for {name} in {out}, skipping", file=sys.stderr)
            continue
        for path in _plot(load_experiment(name), out, fig_dir):
            print(f"figure: {path}")
        drawn += 1
    if not drawn:
        raise QuarticError(
            f"no experiment results in {out_root}; run `quartic reproduce` first "
            "(hidden _-prefixed experiments are drawn only with --only NAME)"
        )
    return 0


def _cmd_diagnose(argv: list[str]) -> int:
    parser = Parser(prog="quartic diagnose", description=diagnose_command.DESCRIPTION)
    diagnose_command.add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return 0 if e.code is None else int(e.code)
    return diagnose_command.run(args)


# --------------------------------------------------------------------------------------------------
# Entry point.


class _UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the ``quartic`` commands use it)."""

    def error(self, message: str):
        # One line instead of argparse's usage block; `--help` still prints the full usage.
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _add_results_args(p: argparse.ArgumentParser, full_help: str, only_order: bool) -> None:
    """The options `reproduce` and `figures` share: which experiments, which results, where."""
    p.add_argument("--full", action="store_true", help=full_help)
    only = "only these experiments" + (", in this order" if only_order else "")
    p.add_argument("--only", metavar="NAME,...", help=only)
    p.add_argument("--out", help="results root (default results/quick, or results with --full)")
    p.add_argument("--figures", default="figures", help="figures folder (default figures)")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="quartic", description="Run and reproduce the quartic experiments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the experiments with their titles and quick-run times")
    p.add_argument("--all", action="store_true", help="include hidden (_-prefixed) experiments")
    p.set_defaults(fn=_cmd_list)

    p = sub.add_parser("run", help="run one experiment (resumes an interrupted run)")
    p.add_argument("name", help="experiment name (see `quartic list`)")
    p.add_argument("--quick", action="store_true", help="use the quick-scale config")
    p.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set seed=1 lr=0.01 model.width=64",
    )  # fmt: skip
    p.add_argument("--out", help="results folder (default results/NAME or results/quick/NAME)")
    p.add_argument("--figures", help="also draw the figures into this folder")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("reproduce", help="run every experiment and print the summary table")
    _add_results_args(p, full_help="full-scale configs (default: quick)", only_order=True)
    p.set_defaults(fn=_cmd_reproduce)

    p = sub.add_parser("figures", help="redraw the figures from saved results only")
    _add_results_args(p, full_help="use results/ (default results/quick)", only_order=False)
    p.set_defaults(fn=_cmd_figures)

    sub.add_parser("diagnose", help="diagnose a model checkpoint (see `quartic diagnose --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `quartic` command with `argv` (default `sys.argv[1:]`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command only ever saves figures; never open a window.
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Compiled programs are kept between runs (QUARTIC_COMPILATION_CACHE=0 turns it off).
    compile_cache.enable()
    ctx = _Context()
    try:
        if argv and argv[0] == "diagnose":
            # Everything after `diagnose` belongs to its own parser, options included.
            return _cmd_diagnose(argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help
            return 0 if e.code is None else int(e.code)
        return args.fn(args, ctx)
    except _UsageError as e:
        return _fail(str(e), 2)
    except DivergenceError as e:
        return _fail(str(e), 1)
    except QuarticError as e:
        return _fail(str(e), 2)
    except FileNotFoundError as e:
        return _fail(f"no such file or folder: {e.filename or e}", 2)
    except KeyboardInterrupt:
        where = f" in {ctx.out_dir}" if ctx.out_dir is not None else ""
        print(
            f"quartic: interrupted; the results finished so far are saved{where}, "
            "and rerunning the same command resumes from them",
            file=sys.stderr,
        )
        return 130


def _fail(message: str, code: int) -> int:
    # One line, whatever the message holds.
    print(f"quartic: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
