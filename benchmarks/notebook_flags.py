"""Each notebook under the suite's fast-compile XLA flags and under XLA's defaults: which notebooks
compile more than they compute (tests/test_notebooks.py's ``COMPUTE_BOUND`` runs the others with
XLA's defaults).

    python benchmarks/notebook_flags.py [--only NAME.py,...] [--out benchmarks/results/notebook-flags-cpu-2core.json]

Each notebook and setting runs alone, in a fresh process with an empty JAX compilation cache, one
after the other. The transformer_collapse notebook reads a θ* trained once before the timings (its
training is the same under both settings' measurement, and the suite trains it once per run).
Writes the wall seconds and the child's peak RSS per notebook and setting.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from quartic.core.jit import FAST_COMPILE_OPTIONS  # noqa: E402

FAST = " ".join(
    f"--{name}={str(value).lower() if isinstance(value, bool) else value}"
    for name, value in FAST_COMPILE_OPTIONS.items()
)
SETTINGS = {"suite's fast-compile flags": FAST, "XLA's defaults": ""}

THETA = """
import jax
jax.config.update("jax_enable_x64", True)
from quartic.models import TransformerConfig
from quartic.studies.training import make_aligned_model
from quartic.tasks import token_world as tw
world = tw.TokenWorld(tw.WorldConfig(seed=0))
cfg = TransformerConfig.preset(
    "2k", vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
)
make_aligned_model(cfg, world, seed=0, cache_dir={cache!r}, progress=False)
"""


def _run(notebook: pathlib.Path, flags: str, theta_cache: str, work: pathlib.Path) -> dict:
    out = work / f"{notebook.stem}-{len(flags)}"
    out.mkdir()
    env = {**os.environ, "QUARTIC_NOTEBOOK_OUT": str(out), "MPLBACKEND": "Agg",
           "QUARTIC_THETA_CACHE": theta_cache, "XLA_FLAGS": flags,
           "JAX_COMPILATION_CACHE_DIR": str(out / "jax_cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    start = time.perf_counter()
    with open(out / "output.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(notebook)], cwd=out, env=env, stdout=log, stderr=log
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{notebook.name} failed:\n{(out / 'output.txt').read_text()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma list of notebook file names")
    p.add_argument("--out", default="benchmarks/results/notebook-flags-cpu-2core.json")
    args = p.parse_args()
    notebooks = sorted((ROOT / "notebooks").glob("*.py"))
    if args.only:
        wanted = set(args.only.split(","))
        notebooks = [n for n in notebooks if n.name in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        theta_cache = str(work / "theta_star")
        subprocess.run([sys.executable, "-c", THETA.format(cache=theta_cache)], check=True)
        results = {}
        for notebook in notebooks:
            results[notebook.name] = {
                name: _run(notebook, flags, theta_cache, work) for name, flags in SETTINGS.items()
            }
            print(notebook.name, results[notebook.name], flush=True)
    record = {"machine": machine_info(), "settings": SETTINGS, "notebooks": results}
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
