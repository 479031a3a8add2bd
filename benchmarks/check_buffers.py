"""What XLA allocates to run the scaling study's AIC check: the buffer assignment of the check's
compiled program at one size, read from XLA's own dump.

    python benchmarks/check_buffers.py [--size 100k] [--out benchmarks/results/check-buffers-cpu-2core.json]

Trains (or loads from ``$QUARTIC_CACHE``) the size's θ*, runs the study's first task's check as
``scaling.task_scaling`` calls it (the model's Fisher spectrum shared, the study's compile options)
in a child process with ``--xla_dump_to=TMP`` added to the caller's ``XLA_FLAGS`` (so that XLA options can be
compared), and reads the check program's
buffer-assignment file: the size of each allocation by kind (parameters, the preallocated temporary
buffer that holds every intermediate, outputs) and, inside the temporary buffer, the number of
values and the shapes that occur most often. The temporary buffer is what each later run of the
check needs on top of what the process already holds.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_child, write_record  # noqa: E402

CHILD = r"""
import json
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from quartic.core import aic
from quartic.studies import scaling
_, setup = scaling.aligned({size!r}, 0)
trace = scaling.exact_trace(setup)
_, pairs = scaling.fisher_spectrum(setup, trace)
batch = setup.task_batch("sort")
ft_data = (batch, jnp.zeros_like(setup.theta), setup.theta)
rows = scaling.chunk_rows(setup.n)
aic.check_aic(params=setup.theta, rank=10, method="lanczos", fisher_trace=trace,
              fisher_eigenpairs=pairs, lambda_max_iters=scaling.STUDY_LAMBDA_MAX_ITERS,
              compiler_options=scaling.check_compiler_options(setup.n),
              **scaling.aic_args(setup, ft_data, rows))
print("RESULT" + json.dumps({{"n": setup.n}}))
"""

ALLOC = re.compile(r"^allocation (\d+): size (\d+),(.*)$")
VALUE = re.compile(r"\(size=(\d+),offset=(\d+)\): (\S+?)\{")


def read_assignment(path: pathlib.Path) -> dict:
    kinds = collections.Counter()
    temp_values, current = [], None
    for line in path.read_text().splitlines():
        m = ALLOC.match(line)
        if m:
            size, rest = int(m.group(2)), m.group(3)
            kind = "preallocated-temp" if "preallocated-temp" in rest else (
                "parameter" if "parameter" in rest else "constant" if "constant" in rest
                else "thread-local" if "thread-local" in rest else "other")  # fmt: skip
            kinds[kind] += size
            current = kind
            continue
        if current == "preallocated-temp" and line.startswith(" value:"):
            v = VALUE.search(line)
            if v:
                temp_values.append((int(v.group(1)), int(v.group(2)), v.group(3)))
    shapes = collections.Counter(s for _, _, s in temp_values)
    return {
        "bytes_by_kind": dict(kinds),
        "temp_values": len(temp_values),
        "temp_largest_value_bytes": max((s for s, _, _ in temp_values), default=0),
        "temp_common_shapes": shapes.most_common(10),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="100k")
    p.add_argument("--out", default="benchmarks/results/check-buffers-cpu-2core.json")
    a = p.parse_args()
    caller_flags = os.environ.get("XLA_FLAGS", "")  # kept: compare XLA's options under the dump
    with tempfile.TemporaryDirectory() as dump:
        flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*measure.*"
        env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, [caller_flags, flags]))}
        n = run_child(CHILD.format(size=a.size), a.size, env)["n"]
        files = sorted(pathlib.Path(dump).glob("*jit_measure*buffer-assignment.txt"))
        if not files:
            raise SystemExit(f"no buffer assignment of the check's program (jit_measure) in {dump}")
        # the check compiles one measurement program (the largest, if a rerun added others)
        path = max(files, key=lambda f: f.stat().st_size)
        found = read_assignment(path)
    temp = found["bytes_by_kind"].get("preallocated-temp", 0)
    print(f"{a.size}: the check's temporary buffer {temp / 2**20:,.0f} MiB in "
          f"{found['temp_values']:,} values (largest {found['temp_largest_value_bytes'] / 2**20:.1f} MiB)")  # fmt: skip
    write_record(a.out, size=a.size, xla_flags=caller_flags, n=n, **found)


if __name__ == "__main__":
    main()
