"""The persistent compilation cache: where it lives, how it is turned off, that a second process
reads what the first compiled, and that the clock sees compile time."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from quartic.harness import compile_cache

PROBE = """
import json, sys, jax, jax.monitoring, jax.numpy as jnp
from quartic.harness import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda e, **_: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
print(json.dumps({"dir": str(compile_cache.enable())}))
# The threshold keeps quick programs out of the cache; this one compiles in well under it on a fast
# machine, and what is tested here is the write-then-read, so every program is written.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x.T, axis=0).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"hits": len(hits)}))
"""


def _probe(env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return lines[0]["dir"], lines[1]["hits"]


@pytest.fixture
def restore_jax_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == tmp_path / "mine" / "jax"
    monkeypatch.delenv(compile_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "quartic" / "jax"


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_the_environment_turns_it_off(monkeypatch, value, restore_jax_cache_dir):
    monkeypatch.setenv(compile_cache.ENV_SWITCH, value)
    assert compile_cache.enable() is None


def test_enable_points_jax_at_the_folder(tmp_path, restore_jax_cache_dir):
    assert compile_cache.enable(tmp_path / "c") == tmp_path / "c"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert (tmp_path / "c").is_dir()


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    env = {**os.environ, compile_cache.ENV_DIR: str(tmp_path)}
    env.pop(compile_cache.ENV_SWITCH, None)
    folder, first = _probe(env)
    assert pathlib.Path(folder) == tmp_path / "jax" and first == 0
    assert any((tmp_path / "jax").iterdir())  # the program was written
    _, second = _probe(env)
    assert second >= 1
    _, off = _probe({**env, compile_cache.ENV_SWITCH: "0"})
    assert off == 0


def test_the_clock_sees_compilation_and_not_a_cached_call():
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + jnp.arange(x.shape[0], dtype=x.dtype))
    x = jnp.ones(37)
    with compile_cache.CompileClock() as first:
        f(x).block_until_ready()
    with compile_cache.CompileClock() as again:
        f(x).block_until_ready()
    assert first.compile > 0 and 0 < first.share <= 1
    assert again.compile == 0.0  # in-memory hit: nothing traced or compiled


def test_fast_compile_flags_reach_a_fresh_process_and_respect_the_callers_choice():
    """The flags are added to XLA_FLAGS before the backend starts, not twice, and never over a
    value the caller set; once the backend has started nothing is added (it would not apply)."""
    code = (
        "import os; from quartic.harness import compile_cache as c; "
        "a = c.fast_compile_flags(); b = c.fast_compile_flags(); import jax; jax.numpy.zeros(1); "
        "print(repr((a, b, c.fast_compile_flags(), os.environ.get('XLA_FLAGS', ''))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, second, late, flags = eval(out.stdout.strip().splitlines()[-1])
    expected = compile_cache.FAST_COMPILE_FLAGS if compile_cache.fast_compile_known() else ()
    assert first == expected and second == () and late == ()
    assert flags == " ".join(expected)
    env["XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=true"  # the caller's: it stands
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rest = tuple(f for f in expected if not f.startswith("--xla_cpu_use_fusion_emitters="))
    flags = " ".join([env["XLA_FLAGS"], *rest])
    assert eval(out.stdout.strip().splitlines()[-1]) == (rest, (), (), flags)
