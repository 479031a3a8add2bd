"""The LP-FT probe stage with the frozen body's features computed once per row, against a forward
pass of the body at every step (the form ``trainer.fit`` had before).

    python benchmarks/probe_features.py [--sizes 2k,30k,100k] [--repeats 3] [--out benchmarks/results/probe-features-cpu-2core.json]

For each size, the transfer study's quick probe (``transfer_robustness`` ``Config.quick()``: 400
steps of the head alone, batch 32, validation every 100 steps on 200 rows, mean pooling; one
decoder per seed (3), freshly initialised: the cost of a step does not depend on the weights) on the two data
the study probes on: a target task's training rows (80) and a source task's (1,400). Reported
per form: the first call's compile time, the median of ``repeats`` calls after it, and whether the
two forms' probed parameters, validation curves and best steps are bitwise equal, and
if not, their largest differences relative to the largest entry.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import time_call, write_record  # noqa: E402
from quartic.harness.cli import load_experiment  # noqa: E402
from quartic.models.transformer import count_params  # noqa: E402
from quartic.studies.transfer import models, pipeline, trainer  # noqa: E402


def rel_diff(a, b) -> float:
    """``max |a − b| / max |b|`` (0 where both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


FORMS = {"body every step (before)": False, "features once (now)": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2k,30k,100k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/probe-features-cpu-2core.json")
    args = ap.parse_args()
    config = load_experiment("transfer_robustness").Config.quick()
    splits = pipeline.world(config)[2]
    target = splits[("surface", "political")]
    source = splits[("surface", "hate")].source_train
    data = {
        "target": target.target_train,
        "source": {k: v[: -config.n_val_eval] for k, v in source.items()},
    }
    val = {k: v[: config.n_val_eval] for k, v in target.val.items()}
    fc = config.probe_fit()
    rows = []
    for size in args.sizes.split(","):
        clf = pipeline.model_cfg(config, size, "decoder")
        start = models.stack([models.init_params(clf, 1000 + i) for i in range(config.n_seeds)])
        keys = pipeline._keys(config, "probe", size)
        for name, train in data.items():
            timings, results = {}, {}
            for form, cache in FORMS.items():
                fit = functools.partial(
                    trainer.fit, "clf", clf, start, train, val, keys, fc, trainable="head",
                    cache_features=cache,
                )  # fmt: skip
                timings[form] = time_call(fit, repeats=args.repeats)
                results[form] = fit()
            a, b = results.values()
            pairs = list(zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True))
            equal = (
                all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
                and np.array_equal(a.val_curve, b.val_curve)
                and np.array_equal(a.best_step, b.best_step)
            )
            params_diff = max(rel_diff(x, y) for x, y in pairs)
            val_diff = rel_diff(a.val_curve, b.val_curve)
            before, now = (timings[f].median_s for f in FORMS)
            row = {
                "size": size,
                "n_params": count_params(clf),
                "data": name,
                "rows": int(len(train["labels"])),
                **{form: t.to_dict() for form, t in timings.items()},
                "speedup": before / now,
                "bitwise_equal": bool(equal),
                "params_max_rel_diff": params_diff,
                "val_curve_max_rel_diff": val_diff,
                "same_best_step": bool(np.array_equal(a.best_step, b.best_step)),
            }
            rows.append(row)
            compile_before, compile_now = (timings[f].compile_s for f in FORMS)
            print(
                f"{size:>5} {name:<6} ({row['rows']:>5} rows): {before:7.3f} s -> {now:7.3f} s "
                f"({row['speedup']:.1f}x; compile {compile_before:.1f} -> {compile_now:.1f} s), "
                f"bitwise equal: {equal}, params {params_diff:.1e}, validation {val_diff:.1e}"
            )
    write_record(args.out, probe=dataclasses.asdict(fc), rows=rows)


if __name__ == "__main__":
    main()
