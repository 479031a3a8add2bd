"""Does the study's pretraining teach a model its language? The probes against the pretraining rate.

Issue 17 item 1 sets the pretraining budget by a probe, not by guess. With the study's budget
(2,000 steps at ``pretrain_lr`` 3e-3) the 1M encoder's masked-token loss fell only from 4.53 to
4.18 (the 100k encoder's to 3.18) and its concept probe reached 0.34, against 0.97 at 30k and
100k (docs/results.md, "Five sizes"). This script pretrains one (size, architecture) as the study
does (``pipeline.pretrain_unit``: the same corpus, objective, batch, steps and seeds) at each
given rate, each in its own cache folder under ``--work``, and records what the pretrain unit
records: the held-out loss curve, the concept probe and synonym neighbours
(``probe.probe_models``), and the task probe of each target of the plain setting
(``pipeline.task_probes``), beside the wall time of each pretraining.

    python benchmarks/transfer_pretrain_lr.py --size 1m --arch encoder --lrs 3e-3,1e-3,3e-4 --seeds 1

Writes benchmarks/results/transfer-pretrain-lr-SIZE-ARCH[-stepsN].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import write_record  # noqa: E402
from experiments.transfer_robustness import Config  # noqa: E402
from quartic.studies.transfer import pipeline  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1m")
    p.add_argument("--arch", default="encoder", choices=("decoder", "encoder"))
    p.add_argument("--lrs", default="3e-3,1e-3,3e-4", help="pretraining rates, comma-separated")
    p.add_argument("--seeds", type=int, default=1, help="seeds (bodies) per rate")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: study's)")
    p.add_argument("--work", default="/tmp/quartic-transfer-pretrain-lr")
    args = p.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",") if x]
    if not lrs or min(lrs) <= 0:
        raise SystemExit(f"--lrs {args.lrs!r}: give positive rates, e.g. 3e-3,1e-3")
    base = Config(sizes=(args.size,), archs=(args.arch,), settings=("plain",), lora_size="",
                  plain_sizes=(args.size,), n_seeds=args.seeds)  # fmt: skip
    if args.steps is not None:
        base = dataclasses.replace(base, pretrain_steps=args.steps)
    rows = []
    for lr in lrs:
        config = dataclasses.replace(base, pretrain_lr=lr)
        work = (
            pathlib.Path(args.work)
            / f"{args.size}-{args.arch}-steps{config.pretrain_steps}-lr{lr:g}"
        )
        t0 = time.perf_counter()
        rec = pipeline.pretrain_unit(config, work, args.size, args.arch)
        seconds = time.perf_counter() - t0
        row = {
            "pretrain_lr": lr,
            "seconds": seconds,
            "val_curve_mean": [float(sum(c) / len(c)) for c in zip(*rec["val_curve"], strict=True)],
            "concept_probe": rec["probe"]["pretrained"]["mean"]["concept_probe_heldout_accuracy"],
            "synonym_nn_rate": rec["probe"]["pretrained"]["mean"]["synonym_nn_rate"],
            "task_probe": {k: v["pretrained"]["mean"] for k, v in rec["task_probe"].items()},
            "task_probe_init": {k: v["init"]["mean"] for k, v in rec["task_probe"].items()},
        }
        rows.append(row)
        print(
            f"lr {lr:g}: {seconds:.0f} s, held-out loss {row['val_curve_mean'][0]:.3f} -> "
            f"{row['val_curve_mean'][-1]:.3f}, concept probe {row['concept_probe']:.3f}, task probe "
            + ", ".join(f"{k} {v:.3f}" for k, v in row["task_probe"].items()),
            flush=True,
        )
    tag = "" if args.steps is None else f"-steps{args.steps}"
    write_record(
        f"benchmarks/results/transfer-pretrain-lr-{args.size}-{args.arch}{tag}.json",
        size=args.size, arch=args.arch, seeds=args.seeds, pretrain_steps=base.pretrain_steps,
        n_params_lm=rec["n_params_lm"], rows=rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
