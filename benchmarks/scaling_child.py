"""One matrix-free AIC check and Taylor onset at a given size, in its own process (peak RSS).

    python benchmarks/scaling_child.py SIZE [ORDER]  -> one JSON line on stdout

The model is a freshly initialised float64 transformer of SIZE (``quartic.studies.scaling.SIZES``)
on the token world: the cost of the check does not depend on training, so no θ* is trained.
Times are wall seconds; each step runs twice, the first time with its compilation. The check's
program is compiled with the study's options (``scaling.check_compiler_options``: XLA:CPU's older
fusion emitters at the chunked sizes), and the heap is released between steps as the study does
(``quartic.core.cache.release_heap``), so the peak is the study's, not a variant's.
"""

import json
import resource
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from quartic.core import aic, cache, theory  # noqa: E402
from quartic.models.transformer import Transformer, functional  # noqa: E402
from quartic.studies import collapse, scaling  # noqa: E402
from quartic.tasks import token_world as tw  # noqa: E402


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds = time.perf_counter() - t0
    cache.release_heap()  # as the study does after each step (scaling.task_scaling)
    return out, {"first_s": first, "s": seconds, "peak_rss_bytes_after": peak_bytes()}


def main(size: str, order: int = 6, rank: int = 10) -> dict:
    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    model = Transformer(scaling.model_config(size, world), rngs=nnx.Rngs(0))
    apply_fn, params = functional(model, nnx.Param)
    setup = collapse.CollapseSetup(apply_fn, params, world, 0)
    batch = setup.task_batch("sort")
    ft_data = (batch, jnp.zeros_like(setup.theta), setup.theta)
    kl = setup.align_fns["kl"]
    rows = scaling.chunk_rows(setup.n)  # row chunks above 30k parameters: one chunk's memory
    # the study's batch of per-example Jacobians (scaling.trace_batch: [batch, 34, n] ≤ 1 GiB)
    per_example = scaling.trace_batch(setup.n, world.vocab_size, setup.theta.dtype.itemsize)
    trace, t_trace = timed(lambda: scaling.exact_trace(setup))

    def check():
        return aic.check_aic(
            params=setup.theta,
            rank=rank,
            method="lanczos",
            num_iters=60,
            fisher_trace=trace,
            compiler_options=scaling.check_compiler_options(setup.n),
            **scaling.aic_args(setup, ft_data, rows),
        )

    rep, t_aic = timed(check)
    align_args, ft_args = scaling.taylor_args(setup, ft_data, rows)
    onset, t_taylor = timed(
        lambda: (
            theory.taylor_onset(
                kl, setup.ft_fn, setup.theta, order, align_args=align_args, ft_args=ft_args
            ).coefficients
        )
    )
    peak = peak_bytes()
    return {
        "size": size,
        "n": setup.n,
        "rank": rank,
        "chunk_rows": rows,
        "trace_batch": per_example,
        "taylor_order": order,
        "device": jax.devices()[0].device_kind,
        "exact_trace": t_trace,
        "aic_check": t_aic,
        "taylor_onset": t_taylor,
        "peak_rss_bytes": peak,
        "check_compiler_options": scaling.check_compiler_options(setup.n),
        "max_residual": float(rep.residuals.max()),
        "lambda_max_ft_residual": rep.lambda_max_ft_residual,
        "taylor_coefficients": [float(c) for c in onset],
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], int(args[1]) if len(args) > 1 else 6)))
