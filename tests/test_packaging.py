"""What `pip install .` ships: every package folder, and the experiments the `quartic` command runs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import tomllib

from quartic.harness import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quartic").rglob("__init__.py")
    }
    assert listed == folders | {"quartic.experiments"}


def test_the_command_finds_the_experiments_through_the_package():
    assert cli.experiments_dir() == ROOT / "experiments"  # editable install: the checkout's folder
    assert set(cli.discover()) >= set(cli.ORDER)


@pytest.mark.slow
def test_a_plain_install_lists_the_experiments(tmp_path):
    """A non-editable install (into a fresh virtual environment that borrows the installed
    dependencies) runs `quartic list` from another folder and finds every experiment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", ROOT],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    env = {k: v for k, v in os.environ.items() if k != cli.EXPERIMENTS_ENV}
    out = subprocess.run(
        [venv / "bin" / "quartic", "list"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    where = subprocess.run(
        [py, "-c", "import quartic.harness.cli as c; print(c.experiments_dir())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert str(venv) in where  # the installed copy, not the checkout
    listed = {line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()}
    assert listed == set(cli.discover())
