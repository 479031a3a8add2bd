"""The `quartic` command and config overrides: typed parsing, one-line errors, kill-and-resume."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Literal, Optional

import pytest

from quartic.core.errors import QuarticError
from quartic.harness import cli
from quartic.harness.config import apply_overrides, config_from_dict, config_keys, config_to_dict
from quartic.harness.runs import read_json, read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
#: A folder of experiments for these tests: a tiny deterministic sweep (example_sweep.py).
FIXTURE_EXPERIMENTS = REPO / "tests" / "fixtures" / "experiments"


@pytest.fixture(autouse=True)
def _fixture_experiments(monkeypatch):
    """Every test here runs the fixture experiments unless it points elsewhere itself."""
    monkeypatch.setenv(cli.EXPERIMENTS_ENV, str(FIXTURE_EXPERIMENTS))


# --------------------------------------------------------------------------------------------------
# Overrides.


@dataclasses.dataclass(frozen=True)
class Model:
    width: int = 8
    act: Literal["relu", "tanh"] = "relu"


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    widths: tuple[int, ...] = (1, 2)
    times: tuple[float, ...] = (0.5,)
    pair: tuple[int, float] = (1, 2.0)
    seed: int | None = None
    eps: Optional[float] = 1e-3  # noqa: UP045 - both spellings of optional are supported
    path: pathlib.Path = pathlib.Path("a")
    model: Model = dataclasses.field(default_factory=Model)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_overrides_parse_each_declared_type():
    base = Cfg()
    cfg = apply_overrides(
        base,
        [
            "steps=1e3",
            "lr=1",
            "flag=YES",
            "name=a=b",
            "widths=4, 8,16",
            "times=",
            "pair=3,0.25",
            "seed=7",
            "eps=None",
            "path=out/x",
            "model.width=64",
            "model.act=tanh",
        ],
    )
    assert cfg == Cfg(
        steps=1000,
        lr=1.0,
        flag=True,
        name="a=b",
        widths=(4, 8, 16),
        times=(),
        pair=(3, 0.25),
        seed=7,
        eps=None,
        path=pathlib.Path("out/x"),
        model=Model(width=64, act="tanh"),
    )
    assert type(cfg.steps) is int and type(cfg.lr) is float and type(cfg.pair[1]) is float
    assert base == Cfg()  # the input is not modified
    for text, value in [("true", True), ("0", False), ("No", False), ("1", True)]:
        assert apply_overrides(base, [f"flag={text}"]).flag is value
    assert apply_overrides(base, ["lr=0.5", "lr=0.25"]).lr == 0.25  # last wins
    assert apply_overrides(base, ["lr=inf"]).lr == float("inf")
    assert config_keys(Cfg)[-2:] == ["model.width", "model.act"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps", "override 'steps' is not of the form key=value"),
        ("=3", "override '=3' is not of the form key=value"),
        ("nope=1", "unknown config key 'nope' for Cfg; valid keys: steps, lr, flag, name, "),
        ("model.nope=1", "unknown config key 'model.nope' for Cfg; valid keys: "),
        ("steps.x=1", "unknown config key 'steps.x' for Cfg ('steps' has no fields)"),
        (
            "model=3",
            "config key 'model' is a group; set its fields instead: model.width, model.act",
        ),
        ("steps=abc", "config key 'steps' expects int, got 'abc'"),
        ("steps=2.5", "config key 'steps' expects int, got '2.5'"),
        ("lr=fast", "config key 'lr' expects float, got 'fast'"),
        ("lr=nan", "config key 'lr' expects float, got 'nan'"),
        ("flag=maybe", "config key 'flag' expects bool (true/false, yes/no, 1/0), got 'maybe'"),
        ("widths=1,x", "config key 'widths' expects a comma list of int, got '1,x'"),
        ("pair=1", "config key 'pair' expects a comma list of 2 values (int, float), got '1'"),
        ("seed=abc", "config key 'seed' expects int or none, got 'abc'"),
        ("model.act=gelu", "config key 'model.act' expects one of 'relu', 'tanh', got 'gelu'"),
        ("steps=-1", "invalid config after overrides ['steps=-1']: steps must be >= 0"),
    ],
)
def test_override_errors_name_the_problem(override, message):
    with pytest.raises(QuarticError) as info:
        apply_overrides(Cfg(), [override])
    assert str(info.value).startswith(message)


def test_override_of_an_unsupported_type_says_so():
    @dataclasses.dataclass(frozen=True)
    class WithDict:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(QuarticError, match="'table' has type dict, which cannot be set"):
        apply_overrides(WithDict(), ["table=1"])


def test_config_json_round_trip():
    cfg = apply_overrides(Cfg(), ["widths=3,5", "seed=2", "model.width=4", "path=p/q"])
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["widths"] == [3, 5] and data["model"] == {"width": 4, "act": "relu"}
    assert config_from_dict(Cfg, data) == cfg
    assert config_from_dict(Cfg, {"lr": 1}) == Cfg(lr=1.0)  # missing keys take defaults
    with pytest.raises(QuarticError, match="unknown config key 'model.depth' for Model"):
        config_from_dict(Cfg, {"model": {"depth": 2}})
    with pytest.raises(QuarticError, match="config key 'steps' expects int, got 'x'"):
        config_from_dict(Cfg, {"steps": "x"})
    with pytest.raises(QuarticError, match="config key 'pair' expects a comma list of 2 values"):
        config_from_dict(Cfg, {"pair": [1]})


# --------------------------------------------------------------------------------------------------
# One-line errors.


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quartic: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_experiment_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "quartic.harness.cli", "run", "no_such_experiment"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    line = _one_line_error(proc.stderr)
    assert "unknown experiment 'no_such_experiment'" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "example_sweep", "--set", "n_units=abc"], "'n_units' expects int, got 'abc'"),
        (["run", "example_sweep", "--set", "depth=3"], "unknown config key 'depth' for Config"),
        (["run", "example_sweep", "--set", "seed"], "not of the form key=value"),
        (["figures", "--out", "missing_results"], "no results folder missing_results"),
        (["reproduce", "--only", "nope"], "unknown experiment 'nope'"),
        (["run"], "the following arguments are required: name (see 'quartic run --help')"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_gives_one_line(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv)
    assert code == 2
    assert expected in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "results").exists()


def test_rerun_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(["run", "example_sweep", "--quick", "--out", str(out), "--set", "n_units=2"]) == 0
    )
    capsys.readouterr()
    code = cli.main(["run", "example_sweep", "--quick", "--out", str(out), "--set", "n_units=3"])
    assert code == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "different config (n_units: 2 -> 3)" in line
    assert sorted(p.name for p in (out / "units").iterdir()) == ["unit_000.json", "unit_001.json"]


def test_overrides_never_overwrite_a_summary_without_its_config(tmp_path, monkeypatch, capsys):
    """The repository's committed quick summaries have no config.json beside them: a run with
    --set overrides into that default folder is refused (nothing written); the plain quick run and
    an explicit --out are not."""
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "results" / "quick" / "example_sweep"
    default.mkdir(parents=True)
    (default / "summary.json").write_text('{"committed": true}')
    code = cli.main(["run", "example_sweep", "--quick", "--set", "n_units=2"])
    assert code == 2
    assert "--out DIR" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in default.iterdir()) == ["summary.json"]
    assert (default / "summary.json").read_text() == '{"committed": true}'
    out = tmp_path / "elsewhere"
    assert (
        cli.main(["run", "example_sweep", "--quick", "--set", "n_units=2", "--out", str(out)]) == 0
    )
    assert cli.main(["run", "example_sweep", "--quick"]) == 0  # regenerates, as reproduce does
    assert (default / "config.json").exists()


def test_missing_experiments_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cli.EXPERIMENTS_ENV, str(tmp_path / "nowhere"))
    assert cli.main(["list"]) == 2
    assert "no experiments folder at" in _one_line_error(capsys.readouterr().err)


def test_diagnose_is_a_subcommand_with_its_own_help(capsys):
    assert cli.main(["diagnose", "--help"]) == 0
    out = capsys.readouterr().out
    assert (
        "usage: quartic diagnose" in out and "--checkpoint" in out and "--explained-variance" in out
    )
    assert cli.main(["diagnose", "--lr", "1e-3"]) == 2  # no --checkpoint: one line, exit 2
    assert "--checkpoint" in _one_line_error(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# list, reproduce, figures (on fake experiments).

FAKE = '''
"""Fake experiment {name}."""
import dataclasses, json, pathlib
from quartic.core.errors import DivergenceError

TITLE = "Fake {name}"
QUICK_SECONDS = 90

@dataclasses.dataclass(frozen=True)
class Config:
    scale: float = 10.0

    @classmethod
    def quick(cls):
        return cls(scale=1.0)

def run(config, out_dir):
    with open(pathlib.Path(out_dir).parent / "calls.log", "a") as f:
        f.write("{name}\\n")
    if "{name}" == "diverges":
        raise DivergenceError("loss is nan at step 3", partial={{"losses": [1.0]}})
    summary = {{"value": config.scale * 2}}
    (pathlib.Path(out_dir) / "summary.json").write_text(json.dumps(summary))
    return summary

def plot(out_dir, fig_dir):
    summary = json.loads((pathlib.Path(out_dir) / "summary.json").read_text())
    path = pathlib.Path(fig_dir) / "{name}.txt"
    path.write_text(str(summary["value"]))
    return [path]

def table(summary):
    return [{{"quantity": "value", "theory": 2.0, "measured": summary["value"], "verdict": "ok"}}]
'''


@pytest.fixture
def fake_experiments(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    folder.mkdir()
    for name in ["zeta", "forecast", "alpha", "quartic_law", "diverges", "_hidden"]:
        (folder / f"{name}.py").write_text(FAKE.format(name=name))
    (folder / "broken.py").write_text("x = 1\n")
    monkeypatch.setenv(cli.EXPERIMENTS_ENV, str(folder))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_list_shows_titles_and_estimates(fake_experiments, capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["quartic_law", "forecast", "alpha", "broken", "diverges", "zeta"]
    assert lines[1].split(None, 1)[1] == "~1.5 min  Fake quartic_law"
    assert "lacks Config, run, plot" in lines[4]
    assert cli.main(["list", "--all"]) == 0
    assert "_hidden" in capsys.readouterr().out


def test_reproduce_then_figures(fake_experiments, capsys):
    root = fake_experiments
    only = "quartic_law,alpha,diverges,zeta,forecast"
    assert cli.main(["reproduce", "--only", only]) == 1  # diverges failed
    captured = capsys.readouterr()
    assert "quartic: error: diverges: loss is nan at step 3 (partial results in" in captured.err
    results = root / "results" / "quick"
    # --only keeps the given order; without it the ORDER list decides (test below).
    assert (results / "calls.log").read_text().split() == only.split(",")
    summary = read_json(results / "summary.json")
    assert summary["mode"] == "quick"
    measured = {r["experiment"]: r["measured"] for r in summary["rows"]}
    assert measured == {
        "quartic_law": 2.0,
        "alpha": 2.0,
        "zeta": 2.0,
        "forecast": 2.0,
        "diverges": None,
    }
    assert read_json(results / "diverges" / "partial.json") == {"losses": [1.0]}
    assert "| quartic_law | value | 2 | 2 | ok |" in (results / "summary.md").read_text()
    assert "| quartic_law | value | 2 | 2 | ok |" in captured.out
    assert sorted(p.name for p in (root / "figures").iterdir()) == [
        "alpha.txt", "forecast.txt", "quartic_law.txt", "zeta.txt",
    ]  # fmt: skip

    # Redraw from the saved results only: run() is not called again.
    for p in (root / "figures").iterdir():
        p.unlink()
    assert cli.main(["figures", "--only", "alpha,zeta", "--figures", "figs"]) == 0
    assert sorted(p.name for p in (root / "figs").iterdir()) == ["alpha.txt", "zeta.txt"]
    assert cli.main(["figures", "--only", "quartic_law,diverges"]) == 2
    assert "no such file or folder" in _one_line_error(capsys.readouterr().err)
    assert len((results / "calls.log").read_text().split()) == 5


def test_reproduce_order_full_and_hidden(fake_experiments, capsys):
    (fake_experiments / "experiments" / "broken.py").unlink()
    (fake_experiments / "experiments" / "diverges.py").unlink()
    assert cli.main(["reproduce", "--full", "--out", "full", "--figures", "f"]) == 0
    calls = (fake_experiments / "full" / "calls.log").read_text().split()
    assert calls == ["quartic_law", "forecast", "alpha", "zeta"]
    rows = read_json(fake_experiments / "full" / "summary.json")["rows"]
    assert [r["measured"] for r in rows] == [20.0] * 4


# --------------------------------------------------------------------------------------------------
# Kill and resume: a real process, killed midway, rerun to completion.


def _reference(tmp_path) -> pathlib.Path:
    out = tmp_path / "reference"
    assert cli.main(["run", "example_sweep", "--quick", "--out", str(out)]) == 0
    return out


def _unit_files(out: pathlib.Path) -> dict[str, tuple[int, int]]:
    units = out / "units"
    if not units.is_dir():
        return {}
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in units.glob("unit_*.json")}


def _interrupt(cmd, out, sig, cwd) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell may start us with SIGINT ignored; the child must see it as Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while len(_unit_files(out)) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep never got going"
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    finished = _unit_files(out)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), finished


def _check_resumed(out, reference, log, finished):
    assert 0 < len(finished) < 12
    after = _unit_files(out)
    assert len(after) == 12
    for name, stat in finished.items():
        assert after[name] == stat, f"{name} was rewritten"
    starts = log.read_text().split()
    for name in finished:
        assert starts.count(name) == 1, f"{name} was recomputed"
    assert sorted(set(starts)) == sorted(after)
    assert len(starts) <= 12 + 1  # at most the unit in flight at the kill runs twice
    for name in after:
        got = read_json(out / "units" / f"{name}.json")
        want = read_json(reference / "units" / f"{name}.json")
        assert got["status"] == "done" and got["result"] == want["result"]
    got, want = read_json(out / "summary.json"), read_json(reference / "summary.json")
    # the units came from two processes (the killed one and this one), each named in the summary
    assert sorted(u for e in got.pop("environments") for u in e["units"]) == sorted(after)
    want.pop("environments")
    assert got == want
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


def test_sigkill_midway_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    reference = _reference(tmp_path)
    out, log = tmp_path / "killed", tmp_path / "starts.log"
    args = ["run", "example_sweep", "--quick", "--out", str(out)]
    sets = ["--set", "delay=0.25", f"log_file={log}"]
    proc, finished = _interrupt(
        [sys.executable, "-m", "quartic.harness.cli", *args, *sets], out, signal.SIGKILL, tmp_path
    )
    assert proc.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert cli.main([*args, *sets]) == 0
    assert f"{len(finished)} of 12 units already in" in capsys.readouterr().err
    _check_resumed(out, reference, log, finished)


def test_ctrl_c_midway_then_resume_via_the_script(tmp_path, capsys):
    reference = _reference(tmp_path)
    out, log = tmp_path / "interrupted", tmp_path / "starts.log"
    script = [sys.executable, str(FIXTURE_EXPERIMENTS / "example_sweep.py")]
    args = ["--quick", "--out", str(out), "--set", "delay=0.25", f"log_file={log}"]
    proc, finished = _interrupt([*script, *args], out, signal.SIGINT, tmp_path)
    assert proc.returncode == 130
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("quartic: interrupted; the results finished so far are saved in")
    assert "rerunning the same command resumes" in last
    assert "Traceback" not in proc.stderr
    capsys.readouterr()
    assert cli.main(["run", "example_sweep", *args]) == 0
    _check_resumed(out, reference, log, finished)


def _experiment_source(summary: str = "{'x': 1}", before: str = "") -> str:
    """A minimal experiment script whose run() executes ``before`` and writes ``summary`` (a Python
    expression, evaluated inside run) as its summary."""
    return (
        "import dataclasses, jax\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Config:\n"
        "    x: int = 1\n"
        "    @classmethod\n"
        "    def quick(cls):\n"
        "        return cls()\n"
        "def run(config, out_dir):\n"
        "    from quartic.harness.runs import RunDir, write_json_atomic\n"
        "    RunDir(out_dir).write_config(config)\n"
        f"    summary = {summary}\n"
        f"{before}"
        "    write_json_atomic(out_dir / 'summary.json', summary)\n"
        "    return summary\n"
        "def plot(out_dir, fig_dir):\n"
        "    return []\n"
    )


def test_run_lists_the_environments_that_computed_its_units(tmp_path, monkeypatch):
    """``quartic run`` adds to summary.json which environment computed which unit (a run without
    units: the one that ran it)."""
    exp = tmp_path / "experiments"
    exp.mkdir()
    sweep = "    from quartic.harness.runs import run_sweep\n    run_sweep({'u1': lambda: {'v': 1}, 'u2': lambda: {'v': 2}}, out_dir)\n"
    (exp / "swept.py").write_text(_experiment_source(before=sweep))
    (exp / "plain.py").write_text(_experiment_source())
    monkeypatch.setenv("QUARTIC_EXPERIMENTS_DIR", str(exp))
    from quartic.harness import cli as cli_module
    from quartic.harness import provenance

    for name in ("swept", "plain"):
        assert cli_module.main(["run", name, "--out", str(tmp_path / name)]) == 0
    swept = json.loads((tmp_path / "swept" / "summary.json").read_text())
    assert swept["x"] == 1
    assert swept["environments"] == [
        {"environment": provenance.environment(), "units": ["u1", "u2"]}
    ]
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert plain["environments"] == [{"environment": provenance.environment(), "units": []}]


def test_reproduce_leaves_out_experiments_not_in_quick_reproduce(tmp_path, monkeypatch):
    exp = tmp_path / "experiments"
    exp.mkdir()
    body = _experiment_source()
    (exp / "fast.py").write_text(body)
    (exp / "slow.py").write_text(body + "IN_QUICK_REPRODUCE = False\n")
    monkeypatch.setenv("QUARTIC_EXPERIMENTS_DIR", str(exp))
    from quartic.harness import cli as cli_module

    out = tmp_path / "out"
    assert cli_module.main(["reproduce", "--out", str(out), "--figures", str(tmp_path / "f")]) == 0
    assert (out / "quick" / "fast" / "summary.json").exists() or (
        out / "fast" / "summary.json"
    ).exists()
    assert not (out / "slow").exists() and not (out / "quick" / "slow").exists()
    assert (
        cli_module.main(
            ["reproduce", "--only", "slow", "--out", str(out), "--figures", str(tmp_path / "f")]
        )
        == 0
    )
    assert (out / "quick" / "slow" / "summary.json").exists() or (
        out / "slow" / "summary.json"
    ).exists()


def test_reproduce_starts_each_experiment_with_the_processs_float64_setting(tmp_path, monkeypatch):
    """An experiment that turns x64 on (as the collapse study does) does not carry it into the next
    one: each starts as `quartic run NAME` in a fresh process would (the transfer study, float32,
    measured other numbers after the collapse study before this)."""
    import jax

    exp = tmp_path / "experiments"
    exp.mkdir()
    body = _experiment_source(  # the experiment flips the flag after reading it
        "{'x64': bool(jax.config.jax_enable_x64)}",
        "    jax.config.update('jax_enable_x64', not summary['x64'])\n",
    )
    for name in ("a_first", "b_second"):
        (exp / f"{name}.py").write_text(body)
    monkeypatch.setenv("QUARTIC_EXPERIMENTS_DIR", str(exp))
    from quartic.harness import cli as cli_module

    before = bool(jax.config.jax_enable_x64)
    out = tmp_path / "out"
    try:
        assert (
            cli_module.main(["reproduce", "--out", str(out), "--figures", str(tmp_path / "f")]) == 0
        )
    finally:
        jax.config.update("jax_enable_x64", before)  # the last experiment flipped it
    seen = [
        json.loads(next(out.rglob(f"{name}/summary.json")).read_text())["x64"]
        for name in ("a_first", "b_second")
    ]
    assert seen == [before, before]
