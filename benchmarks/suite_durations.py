"""Where the suite's time goes: per test file and per xdist worker, from a pytest log.

    python -m pytest -v -n 2 --dist loadfile --durations=0 -p no:cacheprovider > LOG 2>&1
    python benchmarks/suite_durations.py LOG [LOG ...] --out benchmarks/results/suite-durations-cpu-2core.json

``-v`` names the worker of each test (``[gw0] ... PASSED tests/...``) and ``--durations=0`` gives
every test's setup, call and teardown seconds; this adds them up per file and per worker, and
keeps the log's closing line (tests passed, wall seconds). ``tests/conftest.py``'s
``LONGEST_FIRST`` is ordered by these per-file seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

WORKER = re.compile(r"\[(gw\d+)\] \[\s*\d+%\] (?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")
DURATION = re.compile(r"([\d.]+)s (?:call|setup|teardown)\s+(\S+)")
CLOSING = re.compile(r"=+ (.* in [\d.]+s.*) =+")


def summarise(text: str) -> dict:
    worker, per_file, per_worker = (
        {},
        collections.defaultdict(float),
        collections.defaultdict(float),
    )
    closing = None
    for line in text.splitlines():
        if m := WORKER.search(line):
            worker[m.group(2)] = m.group(1)
        elif m := DURATION.match(line):
            seconds, test = float(m.group(1)), m.group(2)
            per_file[test.split("::")[0]] += seconds
            per_worker[worker.get(test, "?")] += seconds
        elif m := CLOSING.match(line):
            closing = m.group(1)
    files = dict(sorted(((f, round(s, 2)) for f, s in per_file.items()), key=lambda x: -x[1]))
    return {"closing": closing, "total_seconds": round(sum(per_file.values()), 2),
            "per_worker": {w: round(s, 2) for w, s in sorted(per_worker.items())},
            "per_file": files}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("--label", action="append", default=[], help="one per log, in order")
    p.add_argument("--out", default="benchmarks/results/suite-durations-cpu-2core.json")
    args = p.parse_args()
    labels = args.label or [pathlib.Path(log).stem for log in args.logs]
    record = {
        lab: summarise(pathlib.Path(log).read_text())
        for lab, log in zip(labels, args.logs, strict=True)
    }
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False))
    for lab, r in record.items():
        print(lab, r["closing"], r["per_worker"], list(r["per_file"].items())[:5])


if __name__ == "__main__":
    main()
