"""The transfer study's attack with its query budget fixed in each compiled program (one program
per budget, the form before a2b38ff) against one program that takes the budget as an argument
(``evaluate.attack_models`` now).

    python benchmarks/attack_budget_program.py [--sizes 2k,30k] [--repeats 3] [--out benchmarks/results/attack-budget-program-cpu-2core.json]

For each size: the quick run's attack (``transfer_robustness`` ``Config.quick()``: A2T, the
budgets it runs, 80 and unlimited, on the first 200 target test rows) on three freshly initialised
decoders stacked as the study stacks its seeds (the attack's cost does not depend on training).
Reported per form: the seconds to compile its programs (``lower().compile()``, nothing cached:
the persistent cache is off here), the median of ``repeats`` runs of every budget after that, and
whether the two forms give the same result fields for every budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import block, write_record  # noqa: E402
from quartic.harness.cli import load_experiment  # noqa: E402
from quartic.models.transformer import count_params  # noqa: E402
from quartic.studies.transfer import evaluate, models, pipeline  # noqa: E402
from quartic.studies.transfer.attack import AttackConfig, greedy_attack  # noqa: E402
from quartic.tasks import synonyms as syn  # noqa: E402


def fixed_budget_program(cfg, config: AttackConfig):
    """The attack program as it was: ``config.query_budget`` a constant of the program."""
    fns = models._model_fns(cfg)
    logits_fn = lambda p, emb, tokens: fns.from_embeddings(p, emb, tokens != cfg.pad_id)  # noqa: E731
    one = functools.partial(greedy_attack, embed_fn=fns.embed, logits_fn=logits_fn, config=config)
    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None), out_axes=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2k,30k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/attack-budget-program-cpu-2core.json")
    args = ap.parse_args()
    config = load_experiment("transfer_robustness").Config.quick()
    _, _, splits, table = pipeline.world(config)
    test = splits[("surface", "political")].test
    tokens = jnp.asarray(test["tokens"][: config.n_attack])
    labels = jnp.asarray(test["labels"][: config.n_attack])
    budgets = [80, None]  # the quick run's: 500 cannot bind at these lengths (budget_is_unlimited)
    base = AttackConfig(
        max_candidates=config.max_candidates, method=config.attack_method, mask_token=syn.PAD
    )
    rows = []
    for size in args.sizes.split(","):
        cfg = pipeline.model_cfg(config, size, "decoder")
        params = models.stack([models.init_params(cfg, 1000 + i) for i in range(config.n_seeds)])
        forms = {}
        # before: one program per budget
        t0 = time.perf_counter()
        fixed = {}
        for b in budgets:
            prog = fixed_budget_program(cfg, dataclasses.replace(base, query_budget=b))
            fixed[b] = prog.lower(params, tokens, labels, table).compile()
        forms["one program per budget (before)"] = (
            time.perf_counter() - t0,
            {b: functools.partial(fixed[b], params, tokens, labels, table) for b in budgets},
        )
        # now: the budget an argument
        prog = evaluate._attack_program(cfg, base)
        t0 = time.perf_counter()
        shared = prog.lower(params, tokens, labels, table, jnp.int32(0)).compile()
        forms["budget as an argument (now)"] = (
            time.perf_counter() - t0,
            {
                b: functools.partial(
                    shared, params, tokens, labels, table, jnp.int32(-1 if b is None else b)
                )
                for b in budgets
            },
        )
        outputs, times = {}, {name: [] for name in forms}
        for name, (_, calls) in forms.items():
            outputs[name] = {b: jax.device_get(block(call())) for b, call in calls.items()}
        for _ in range(args.repeats):  # the forms in turn, round by round
            for name, (_, calls) in forms.items():
                t0 = time.perf_counter()
                for call in calls.values():
                    block(call())
                times[name].append(time.perf_counter() - t0)
        a, b = outputs.values()
        equal = all(
            np.array_equal(np.asarray(x), np.asarray(y))
            for bud in budgets
            for x, y in zip(a[bud], b[bud], strict=True)
        )
        row = {
            "size": size,
            "n_params": count_params(cfg),
            "models": config.n_seeds,
            "rows": int(tokens.shape[0]),
            "budgets": ["unlimited" if x is None else x for x in budgets],
            **{
                name: {
                    "compile_s": forms[name][0],
                    "run_all_budgets_median_s": statistics.median(times[name]),
                    "times_s": times[name],
                }
                for name in forms
            },
            "bitwise_equal": bool(equal),
        }
        rows.append(row)
        (c0, c1), (r0, r1) = (
            [row[n]["compile_s"] for n in forms],
            [row[n]["run_all_budgets_median_s"] for n in forms],
        )
        print(
            f"{size:>5}: compile {c0:.1f} -> {c1:.1f} s, both budgets run {r0:.2f} -> {r1:.2f} s, "
            f"bitwise equal: {equal}"
        )
    write_record(args.out, attack=dataclasses.asdict(base), rows=rows)


if __name__ == "__main__":
    main()
