"""Peak memory and time of the deletion-ranked (WIR) attack where the long-sentence transfer run
measured 18.4 GiB (issue 17): the 30k decoder at 48-64 tokens, up to 24 synonyms, 3 stacked seeds,
the first 300 test rows in one chunk (``n_attack``, ``batch_size=512``), budget 80.

    python benchmarks/wir_memory.py [--out FILE.json]

Each setting runs in its own child process (``--child SETTING``), so each peak RSS is its own:

- ``one_forward``: every masked copy of every row in one forward (B·T rows per model), as the
  attack did before ``wir_order`` took ``positions_per_forward``;
- ``grouped``: what the attack does now, K positions (its candidate count) per forward.

The weights are freshly initialised (memory and time do not depend on training), so the attack
outcomes are not the study's. The two settings' outcomes are compared: same statuses and queries.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import resource
import subprocess
import sys
import time

SETTINGS = ("one_forward", "grouped")


def child(setting: str) -> dict:
    import jax
    import numpy as np

    from quartic.studies.transfer import attack, evaluate, models, pipeline
    from quartic.tasks import synonyms as syn

    if setting == "one_forward":  # the ranking as it was: all T masked positions in one forward
        grouped = attack.wir_order

        @functools.wraps(grouped)
        def one_forward(*args, positions_per_forward=None, **kwargs):
            del positions_per_forward
            return grouped(*args, **kwargs)

        attack.wir_order = one_forward  # greedy_attack reads the module's name when it traces
    config = pipeline.StudyConfig(
        sizes=("30k",), archs=("decoder",), settings=("surface",), min_len=48, max_len=64,
        max_synonyms=24, pooling="mean", attack_method="wir", lora_size="", n_seeds=3,
    )  # fmt: skip
    _, _, splits, table = pipeline.world(config)
    split = splits[("surface", "political")]
    cfg = pipeline.model_cfg(config, "30k", "decoder")
    params = models.stack([models.init_params(cfg, s) for s in range(config.n_seeds)])
    rows = {k: v[: config.n_attack] for k, v in split.test.items()}
    ac = attack.AttackConfig(
        max_candidates=config.max_candidates, query_budget=80, method="wir", mask_token=syn.PAD
    )
    times = []
    for _ in range(2):  # the first call compiles
        t0 = time.perf_counter()
        out = evaluate.attack_models(cfg, params, rows, table, ac, batch_size=512)
        times.append(time.perf_counter() - t0)
    return {
        "setting": setting,
        "rows": int(rows["tokens"].shape[0]),
        "seq_len": int(rows["tokens"].shape[1]),
        "models": config.n_seeds,
        "first_call_s": times[0],
        "second_call_s": times[1],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "status": [np.asarray(r.status).tolist() for r in out],
        "queries": [np.asarray(r.queries).tolist() for r in out],
        "jax": jax.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=SETTINGS)
    p.add_argument("--out", default="benchmarks/results/wir-memory-cpu-2core.json")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs = {}
    for setting in SETTINGS:
        done = subprocess.run(
            [sys.executable, __file__, "--child", setting], capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
        runs[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    same = all(runs[s]["status"] == runs["grouped"]["status"] for s in SETTINGS) and all(
        runs[s]["queries"] == runs["grouped"]["queries"] for s in SETTINGS
    )
    record = {
        "command": "python benchmarks/wir_memory.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "same_outcomes": same,
        **{
            s: {k: v for k, v in r.items() if k not in ("status", "queries")}
            for s, r in runs.items()
        },
    }
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
