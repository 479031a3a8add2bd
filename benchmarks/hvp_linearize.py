"""Hessian products inside one compiled loop: the gradient linearised once (``jax.linearize``, the
form ``curvature.hvp_fn`` had before) against forward-over-reverse per product (its form now).

    python benchmarks/hvp_linearize.py [--sizes 2k,30k,100k] [--products 10] [--repeats 5] [--out benchmarks/results/hvp-linearize-cpu-2core.json]

For each size of the scaling study (freshly initialised float64 model; the cost of a product does
not depend on training) and each of the AIC check's two losses, the KL drift (L_A) and the task
loss (L_FT) at the first task, in the form the study passes them (row chunks above
``scaling.CHUNK_ABOVE``, ``scaling.aic_args``): one program that makes the Hessian matvec and
applies it ``products`` times in a ``fori_loop``, as the check's Lanczos does. Reported per form:
XLA's temporary buffer (``memory_analysis``), the compile time, the median of ``repeats`` runs
after a warm-up, and the largest difference between the two forms' results relative to its norm.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import write_record  # noqa: E402
from quartic.models.transformer import Transformer, functional  # noqa: E402
from quartic.studies import collapse, scaling  # noqa: E402
from quartic.tasks import token_world as tw  # noqa: E402


def linearized(loss_fn, theta):
    _, lin = jax.linearize(jax.grad(loss_fn), theta)
    return lin


def per_product(loss_fn, theta):
    grad = jax.grad(loss_fn)
    return lambda v: jax.jvp(grad, (theta,), (v,))[1]


FORMS = {"linearize (before)": linearized, "per product (now)": per_product}


def measure(form, loss, data, theta, products: int, repeats: int) -> tuple[dict, jax.Array]:
    def program(th, c):
        mv = form(lambda x: loss(x, c), th)
        return jax.lax.fori_loop(0, products, lambda i, v: mv(v) / (1.0 + jnp.linalg.norm(v)), th)

    t0 = time.perf_counter()
    compiled = jax.jit(program).lower(theta, data).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(theta, data))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(theta, data))
        times.append(time.perf_counter() - t0)
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = {"temp_bytes": int(temp), "compile_s": compile_s, "median_s": statistics.median(times)}
    return row | {"times_s": times}, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2k,30k,100k")
    p.add_argument("--products", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/hvp-linearize-cpu-2core.json")
    a = p.parse_args()
    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    results = {}
    for size in a.sizes.split(","):
        model = Transformer(scaling.model_config(size, world), rngs=nnx.Rngs(0))
        apply_fn, params = functional(model, nnx.Param)
        setup = collapse.CollapseSetup(apply_fn, params, world, 0)
        theta = setup.theta
        ft_data = (setup.task_batch("sort"), jnp.zeros_like(theta), theta)
        rows = scaling.chunk_rows(setup.n)
        args = scaling.aic_args(setup, ft_data, rows)
        results[size] = {"n": setup.n, "rows_per_chunk": rows, "losses": {}}
        for name in ("align", "ft"):
            loss, data = args[f"{name}_loss_fn"], args[f"{name}_batch"]
            entry, outs = {}, []
            for label, form in FORMS.items():
                entry[label], out = measure(form, loss, data, theta, a.products, a.repeats)
                outs.append(out)
                r = entry[label]
                print(
                    f"{size} {name} {label}: temp {r['temp_bytes'] / 2**20:,.1f} MiB, compile "
                    f"{r['compile_s']:.1f} s, {a.products} products {r['median_s']:.3f} s",
                    flush=True,
                )
            diff = float(jnp.linalg.norm(outs[0] - outs[1]) / jnp.linalg.norm(outs[0]))
            entry["relative_difference"] = diff
            print(f"{size} {name}: forms differ by {diff:.1e} relative", flush=True)
            results[size]["losses"][name] = entry
    write_record(a.out, products=a.products, repeats=a.repeats, sizes=results)


if __name__ == "__main__":
    main()
