"""Where an experiment's compile time goes: JAX's compile events summed by kind, and XLA's
compilations by program name.

    QUARTIC_CACHE_DIR=C QUARTIC_CACHE=T python benchmarks/compile_events.py NAME --out DIR [--quick] [--set key=value ...] [--json FILE]

Runs ``quartic run NAME`` in this process (the command enables the persistent compilation cache
as usual, so a second call with the same ``QUARTIC_CACHE_DIR`` shows what the cache saves) and
prints, after the command's own output:

- per duration event (tracing, lowering to MLIR, XLA compilation, cache reads): total seconds and
  count;
- per counted event (cache hits and misses, requests that could use the cache): the count;
- per program name, from JAX's ``Finished XLA compilation of NAME in S sec`` log records: total
  seconds and count, the largest first. JAX times the compile or the persistent cache's read
  with that line, so for a program found in the cache it is the read.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

FINISHED = re.compile(r"Finished XLA compilation of (.+) in ([0-9.eE+-]+) sec")


class _Programs(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seconds: collections.Counter = collections.Counter()
        self.count: collections.Counter = collections.Counter()

    def emit(self, record):
        found = FINISHED.search(record.getMessage())
        if found:
            self.seconds[found.group(1)] += float(found.group(2))
            self.count[found.group(1)] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--json", help="also write the totals to this file")
    args = ap.parse_args()

    durations, counts = collections.Counter(), collections.Counter()
    n_durations = collections.Counter()

    def on_duration(event, seconds, **_):
        durations[event] += seconds
        n_durations[event] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(lambda event, **_: counts.update([event]))
    programs = _Programs()
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(programs)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the records are counted, not printed
    for other in ("jax._src.interpreters.pxla", "jax._src.compiler"):  # their per-compile lines
        logging.getLogger(other).setLevel(logging.ERROR)
    jax.config.update("jax_log_compiles", True)

    from quartic.harness.cli import main as quartic_main

    argv = ["run", args.name, "--out", args.out, *(["--quick"] if args.quick else [])]
    argv += ["--set", *args.set] if args.set else []
    t0 = time.perf_counter()
    code = quartic_main(argv)
    wall = time.perf_counter() - t0
    compile_events = {k: v for k, v in durations.items() if "/compile" in k}
    print(f"\nwall {wall:.1f} s (exit {code})")
    for event, seconds in sorted(compile_events.items(), key=lambda kv: -kv[1]):
        print(f"{seconds:8.1f} s {n_durations[event]:6d}  {event}")
    for event, n in counts.most_common():
        if "compil" in event:
            print(f"{n:17d}  {event}")
    print("XLA compilations by program (seconds, count):")
    for name, seconds in programs.seconds.most_common(15):
        print(f"{seconds:8.1f} s {programs.count[name]:6d}  {name}")
    if args.json:
        record = {
            "argv": argv,
            "wall_s": wall,
            "durations_s": compile_events,
            "duration_counts": {k: n_durations[k] for k in compile_events},
            "counts": {k: v for k, v in counts.items() if "compil" in k},
            "programs_s": dict(programs.seconds.most_common()),
            "program_counts": dict(programs.count),
        }
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
