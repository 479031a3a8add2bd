"""Resident memory of a ``quartic`` command stage by stage: the table behind the per-stage peaks that
docs/performance.md quotes for ``quartic run scaling --quick`` and ``quartic reproduce``.

    python benchmarks/stage_memory.py run OUT -- quartic reproduce --out DIR   # sample a run
    python benchmarks/stage_memory.py table OUT                                 # its table

``run`` starts the command, writes each line it prints on stderr with its time (``OUT.log``) and
the resident memory of the command's process tree every 0.2 s (``OUT.rss``: time and KiB). The
samples are taken from ``/proc``. ``table`` cuts the samples at each line that ends a stage (a
scaling unit's notes, an experiment's ``==`` header) and prints, for each stage, the resident
memory at its start, its minimum, its maximum and at its end, in MiB.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import threading
import time


def _tree_rss_kib(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += int(next(x for x in f if x.startswith("VmRSS")).split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total


def run(out: str, command: list[str]) -> int:
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    done = threading.Event()

    def sample():
        with open(out + ".rss", "w") as f:
            while not done.is_set():
                f.write(f"{time.time():.3f} {_tree_rss_kib(proc.pid)}\n")
                time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(out + ".log", "w") as log:
        for chunk in proc.stderr:
            for line in chunk.replace("\r", "\n").splitlines():
                if line.strip():
                    log.write(f"{time.time():.3f} {line}\n")
    code = proc.wait()
    done.set()
    sampler.join()
    return code


def table(out: str) -> list[str]:
    events = []
    for line in pathlib.Path(out + ".log").read_text().splitlines():
        t, msg = line.split(" ", 1)
        if msg.startswith("==") or "scaling: " in msg:
            events.append((float(t), msg.strip()))
    samples = []
    for line in pathlib.Path(out + ".rss").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
            samples.append((float(parts[0]), int(parts[1]) / 1024))
    rows, prev = ["start    min    max    end  (MiB)  stage ended by"], samples[0][0]
    for t, msg in events:
        seg = [r for s, r in samples if prev <= s <= t]
        if seg:
            rows.append(
                f"{seg[0]:5.0f} {min(seg):6.0f} {max(seg):6.0f} {seg[-1]:6.0f}         {msg}"
            )
        prev = t
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("run", "table"))
    p.add_argument("out")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.mode == "run":
        command = a.command[1:] if a.command[:1] == ["--"] else a.command
        return run(a.out, command)
    print("\n".join(table(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
