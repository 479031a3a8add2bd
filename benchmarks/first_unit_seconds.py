"""How much of a run's time is the first unit of each kind (which compiles the programs the rest
reuse): per group of units that share programs, the first's seconds against the others' mean.

    python benchmarks/first_unit_seconds.py benchmarks/results/transfer-quick-units-780b969.json

Groups the transfer study's unit names (``kind__[setting__]arch__size__ft__...``) by kind, arch,
size and fine-tuning; the first unit's excess over the others' mean is its compile, roughly.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

FIELDS = ("decoder", "encoder", "2k", "7k", "30k", "100k", "1m", "full", "lora")


def groups(unit_seconds: dict[str, float]) -> dict[str, list[float]]:
    out = collections.defaultdict(list)
    for name, seconds in unit_seconds.items():
        kind, *parts = name.split("__")
        out[":".join([kind, "/".join(p for p in parts if p in FIELDS)])].append(seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", help="a JSON file with unit_seconds {name: seconds}")
    args = p.parse_args()
    unit_seconds = json.loads(pathlib.Path(args.record).read_text())["unit_seconds"]
    excess = {}
    for key, seconds in sorted(groups(unit_seconds).items()):
        first, *rest = sorted(seconds, reverse=True)
        mean = sum(rest) / len(rest) if rest else 0.0
        if rest:
            excess[key] = first - mean
        print(f"{key:30s} n={len(seconds)} sum={sum(seconds):6.1f} first={first:5.1f} "
              f"rest mean={mean:5.1f}")  # fmt: skip
    print(f"units: {sum(unit_seconds.values()):.1f} s; first units' excess: "
          f"{sum(excess.values()):.1f} s (source {sum(v for k, v in excess.items() if k.startswith('source')):.1f} s, "
          f"bridge {sum(v for k, v in excess.items() if k.startswith('bridge')):.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
