"""quartic's benchmark suite: one command, one JSON and one markdown table per device.

    python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--out benchmarks/results]

Sections (``--only``): ``hvp`` (gradient vs HVP on the transformer), ``dense`` (dense Hessian from
batched vs sequential HVPs, peak memory), ``lanczos`` (top-20/bottom-5 vs dense ``eigh``; top-20 at
1M parameters), ``aic`` (``check_aic`` end to end), ``scaling`` (the scaling study's
matrix-free AIC check and order-6 Taylor onset at 1M parameters in a child process, with its peak
RSS), ``sweep`` (quartic-law trajectories per second, single vs vmapped), ``peers`` (PyHessian and alignment-risk in the same process; skipped with a
message when torch is absent).

Writes ``<out>/<device>.json`` (every measurement, machine info, settings) and ``<out>/<device>.md``
(the table), where ``<device>`` is ``cpu-<cores>core`` or the accelerator's name. Each figure is the
median of repeats after ``block_until_ready``; compile time is reported separately; ratios are
against a baseline measured in the same process, interleaved with it. Full run on a 2-core CPU:
about 15 minutes; ``--quick``: a few minutes (2k/10k/100k models only, fewer repeats).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # float64 where the state is float64; float32 stays so

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import (  # noqa: E402
    VOCAB,
    compile_seconds,
    end_to_end,
    lm_loss,
    make_problem,
    time_interleaved,
    time_jit,
)

from quartic.core import aic, curvature, dynamics, problems, pytree  # noqa: E402
from quartic.core import train as training  # noqa: E402

SECTIONS = (
    "hvp",
    "train",
    "dense",
    "lanczos",
    "lanczos_1m",
    "aic",
    "scaling",
    "sweep",
    "peers",
)
_cache: dict = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flat_loss(prob):
    return pytree.flat_fn(lambda p, b: lm_loss(prob.apply_fn, p, b), prob.params, prob.batch)


# ----------------------------------------------------------------------------------------------
# 1. gradient vs HVP


def bench_hvp(quick: bool) -> dict:
    sizes = ["10k", "100k"] if quick else ["10k", "100k", "1m"]
    rows = []
    for size in sizes:
        prob = make_problem(size, "float32", batch_size=16)
        loss = lambda p, b, prob=prob: lm_loss(prob.apply_fn, p, b)
        scale = 1.0 / np.sqrt(prob.n)
        v = jax.tree.map(lambda x, s=scale: jnp.full_like(x, s), prob.params)
        _, lin = jax.linearize(jax.grad(lambda p, loss=loss, b=prob.batch: loss(p, b)), prob.params)
        t = time_interleaved(
            {
                "grad": (lambda p, b, loss=loss: jax.grad(loss)(p, b), (prob.params, prob.batch)),
                "hvp": (
                    lambda p, w, b, loss=loss: curvature.hvp(loss, p, w, b),
                    (prob.params, v, prob.batch),
                ),
                "hvp_linearized": (lambda w, lin=lin: lin(w), (v,)),
            },
            repeats=9 if quick else 15,
        )
        g = t["grad"].median_s
        rows.append(
            {
                "size": size,
                "n": prob.n,
                "dtype": "float32",
                "batch": [16, common.SEQ],
                "grad_s": g,
                "hvp_s": t["hvp"].median_s,
                "hvp_linearized_s": t["hvp_linearized"].median_s,
                "hvp_over_grad": t["hvp"].median_s / g,
                "hvp_linearized_over_grad": t["hvp_linearized"].median_s / g,
                "compile_s": {k: x.compile_s for k, x in t.items()},
                "times_s": {k: x.times_s for k, x in t.items()},
            }
        )
        log(
            f"hvp {size}: n={prob.n} grad {g * 1e3:.2f} ms, hvp/grad {rows[-1]['hvp_over_grad']:.2f}"
        )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 1b. training steps: donated vs kept state


def bench_train(quick: bool) -> dict:
    """``training.train``'s compiled chunk (Adam, 20 steps, batch 16 of 256 rows), with the
    parameters and optimizer state donated to it or not: time per step and XLA peak memory.

    Donated inputs are consumed by the call, so every timed call gets a fresh copy of the state
    (made outside the timed region); the two variants alternate.
    """
    sizes = ["10k", "100k"] if quick else ["100k", "1m"]
    chunk, repeats = 20, 5 if quick else 7
    rows = []
    for size in sizes:
        prob = make_problem(size, "float32", batch_size=256)
        loss = lambda p, b, prob=prob: lm_loss(prob.apply_fn, p, b)
        opt = optax.adam(1e-3)
        state = (prob.params, opt.init(prob.params))
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        key = jax.random.PRNGKey(0)
        compiled, compile_s, peak = {}, {}, {}
        for donate in (True, False):
            run = training._minibatch_chunk(loss, opt, 16, chunk, donate)
            t0 = time.perf_counter()
            compiled[donate] = run.lower(*state, prob.batch, key, chunk).compile()
            compile_s[donate] = time.perf_counter() - t0
            peak[donate] = common._peak_bytes(compiled[donate])
            common.block(compiled[donate](*jax.tree.map(jnp.copy, state), prob.batch, key, chunk))
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for donate in (True, False):
                fresh = common.block(jax.tree.map(jnp.copy, state))
                t0 = time.perf_counter()
                common.block(compiled[donate](*fresh, prob.batch, key, chunk))
                times[donate].append((time.perf_counter() - t0) / chunk)
                del fresh
        med = {d: statistics.median(t) for d, t in times.items()}
        rows.append(
            {
                "size": size,
                "n": prob.n,
                "dtype": "float32",
                "chunk_steps": chunk,
                "state_bytes": state_bytes,
                "step_s": {"donated": med[True], "kept": med[False]},
                "donated_over_kept": med[True] / med[False],
                "peak_bytes": {"donated": peak[True], "kept": peak[False]},
                "compile_s": {"donated": compile_s[True], "kept": compile_s[False]},
                "times_s": {"donated": times[True], "kept": times[False]},
            }
        )
        log(
            f"train {size}: {med[True] * 1e3:.2f} ms/step donated, {med[False] * 1e3:.2f} kept; "
            f"peak {peak[True] and peak[True] / 1e6:.1f} vs {peak[False] and peak[False] / 1e6:.1f} MB"
        )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 2. dense Hessian: batched vs sequential


def bench_dense(quick: bool) -> dict:
    sizes = ["2k"] if quick else ["2k", "8k"]
    rows = []
    for size in sizes:
        prob = make_problem(size, "float64", batch_size=16)
        f, theta, _ = flat_loss(prob)
        n = theta.shape[0]
        reps = 1 if size == "8k" else 3
        # chunk 1: the products one at a time inside one program (lax.map); >1: chunked vmap
        by_chunk = {
            c: time_jit(
                lambda th, f=f, c=c: curvature.dense_hessian(f, th, c),
                theta,
                repeats=reps,
                warmup=size != "8k",
            )
            for c in (1, 16, 64)
        }
        chunk = min((c for c in by_chunk if c > 1), key=lambda c: by_chunk[c].median_s)
        batched, seq_map = by_chunk[chunk], by_chunk[1]
        # n calls of a jitted HVP from Python: what a loop over the unit vectors costs
        hvp1 = jax.jit(lambda th, v, f=f: curvature.hvp(f, th, v))
        eye = np.eye(n, dtype=np.float64)
        with compile_seconds() as c:
            jax.block_until_ready(hvp1(theta, jnp.asarray(eye[0])))
        cols = [jnp.asarray(eye[j]) for j in range(n)]
        t0 = time.perf_counter()
        out = [hvp1(theta, e) for e in cols]
        jax.block_until_ready(out)
        loop_s = time.perf_counter() - t0
        h = np.asarray(by_chunk[chunk].output)
        h_loop = np.stack([np.asarray(o) for o in out], axis=1)
        del out, cols
        sym = float(np.abs(h - h.T).max() / np.abs(h).max())
        agree = float(np.abs(h - h_loop).max() / np.abs(h).max())
        _cache[("hessian", size)] = (prob, h)
        rows.append(
            {
                "size": size,
                "n": int(n),
                "dtype": "float64",
                "chunk_size": chunk,
                "by_chunk": {str(c): t.to_dict() for c, t in by_chunk.items()},
                "batched_s": batched.median_s,
                "batched_compile_s": batched.compile_s,
                "batched_peak_bytes": batched.peak_bytes,
                "sequential_map_s": seq_map.median_s,
                "sequential_map_compile_s": seq_map.compile_s,
                "sequential_map_peak_bytes": seq_map.peak_bytes,
                "python_loop_s": loop_s,
                "python_loop_compile_s": c.seconds,
                "speedup_vs_python_loop": loop_s / batched.median_s,
                "speedup_vs_sequential_map": seq_map.median_s / batched.median_s,
                "sequential_map_speedup_vs_python_loop": loop_s / seq_map.median_s,
                "symmetry_rel": sym,
                "batched_vs_loop_rel": agree,
            }
        )
        log(
            f"dense {size}: n={n} batched {batched.median_s:.2f}s, lax.map seq "
            f"{seq_map.median_s:.2f}s, python loop {loop_s:.2f}s"
        )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 3. Lanczos vs eigh


def bench_lanczos(quick: bool) -> dict:
    sizes = ["2k"] if quick else ["2k", "8k"]
    rows = []
    for size in sizes:
        if ("hessian", size) not in _cache:
            prob = make_problem(size, "float64", batch_size=16)
            f, theta, _ = flat_loss(prob)
            _cache[("hessian", size)] = (prob, np.asarray(curvature.dense_hessian(f, theta, 64)))
        prob, h = _cache[("hessian", size)]
        f, theta, _ = flat_loss(prob)
        n = theta.shape[0]
        # the dense oracle: all eigenvalues by LAPACK (values only, the cheapest dense route)
        t0 = time.perf_counter()
        w = np.linalg.eigvalsh(0.5 * (h + h.T))
        eig_s = time.perf_counter() - t0
        top_exact, bot_exact = w[::-1][:20], w[:5]
        for m in (150, 275):
            lz = time_jit(
                lambda th, f=f, n=n, m=m: curvature.lanczos_eigh(
                    curvature.hvp_fn(f, th), n, 20, 5, num_iters=m, dtype=th.dtype
                ),
                theta,
                repeats=3,
            )
            r = lz.output
            top, bot = np.asarray(r.top.values), np.asarray(r.bottom.values)
            rows.append(
                {
                    "size": size,
                    "n": int(n),
                    "dtype": "float64",
                    "num_iters": m,
                    "num_hvps": int(r.num_matvecs),
                    "lanczos_s": lz.median_s,
                    "lanczos_compile_s": lz.compile_s,
                    "eigh_s": eig_s,
                    "eigh_routine": "numpy.linalg.eigvalsh (LAPACK syevd, values only)",
                    "top20_rel_err": float(np.max(np.abs(top - top_exact) / np.abs(top_exact))),
                    "bottom5_rel_err": float(np.max(np.abs(bot - bot_exact) / np.abs(bot_exact))),
                    "top20_max_residual": float(np.max(np.asarray(r.top.residuals))),
                    "bottom5_max_residual": float(np.max(np.asarray(r.bottom.residuals))),
                    "lambda_max": float(w[-1]),
                    "lambda_min": float(w[0]),
                }
            )
            log(
                f"lanczos {size} m={m}: {lz.median_s:.2f}s (eigh {eig_s:.2f}s), "
                f"rel err top {rows[-1]['top20_rel_err']:.1e} bottom {rows[-1]['bottom5_rel_err']:.1e}"
            )
    return {"rows": rows}


def bench_lanczos_1m(quick: bool) -> dict:
    """Top-20 by Lanczos at ~1M parameters (float32), with ``curvature.lanczos_eigh`` as it is.

    (Results recorded before the tridiagonalisation fix moved into the core keep a ``proposed``
    row beside the old ``core`` one; the table shows whichever variants a result holds.)
    """

    size = "100k" if quick else "1m"
    prob = make_problem(size, "float32", batch_size=16)
    f, theta, _ = flat_loss(prob)
    n = theta.shape[0]
    m = 100

    out = {}
    for variant in ("core",):

        def top20(th):
            return curvature.lanczos_eigh(
                curvature.hvp_fn(f, th), n, 20, 0, num_iters=m, dtype=th.dtype
            ).top

        lz = time_jit(top20, theta, repeats=1, warmup=False)
        vals, res = np.asarray(lz.output.values), np.asarray(lz.output.residuals)
        out[variant] = {
            "size": size,
            "n": int(n),
            "dtype": "float32",
            "num_iters": m,
            "num_hvps": m + 20,
            "lanczos_s": lz.median_s,
            "lanczos_compile_s": lz.compile_s,
            "lanczos_peak_bytes": lz.peak_bytes,
            "top20": vals.tolist(),
            "top20_max_residual": float(res.max()),
            "top20_max_rel_residual": float(np.max(res / np.abs(vals))),
        }
        log(f"lanczos {size} {variant}: n={n} {lz.median_s:.1f}s + compile {lz.compile_s:.1f}s")
    return out


# ----------------------------------------------------------------------------------------------
# 4. AIC end to end


def bench_aic(quick: bool) -> dict:
    """``check_aic`` end to end. F is the Hessian of the LM loss (indefinite at random init, so the
    dense path takes the full ``eigh``) or, for ``"gn"``, the Gauss–Newton Fisher of the same
    logits (positive semi-definite: the dense path takes the partial eigensolver)."""
    cases = [
        ("2k", "float64", "dense", "hessian"),
        ("2k", "float64", "lanczos", "hessian"),
        ("100k", "float64", "lanczos", "hessian"),
    ]
    if not quick:
        cases[1:1] = [("8k", "float64", "dense", "hessian"), ("8k", "float64", "dense", "gn")]
    rows = []
    for size, dtype, method, curv in cases:
        prob = make_problem(size, dtype, batch_size=16)
        loss = lambda p, b, prob=prob: lm_loss(prob.apply_fn, p, b)
        logits = lambda p, b, prob=prob: prob.apply_fn(p, b["tokens"]).reshape(-1, VOCAB)
        fisher = aic.GaussNewton(logits) if curv == "gn" else None

        def call(prob=prob, loss=loss, method=method, fisher=fisher):
            rep = aic.check_aic(
                loss,
                loss,
                prob.params,
                8,
                align_batch=prob.batch,
                ft_batch=prob.ft_batch,
                method=method,
                chunk_size=64,
                fisher=fisher,
                fisher_batch=prob.batch if fisher is not None else None,
            )
            return rep.gamma_fisher

        t = end_to_end(call, repeats=1 if size == "8k" else 2)
        row = {"size": size, "n": prob.n, "dtype": dtype, "method": method, "curvature": curv}
        rows.append({**row, "rank": 8, **t})
        log(
            f"aic {size} {method} {curv}: {t['wall_s']:.2f}s wall ({t['compile_s']:.2f}s compiling)"
        )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 4b. the scaling study's matrix-free AIC check and Taylor onset, in a child process (peak RSS)


def bench_scaling(quick: bool, sizes: tuple[str, ...] | None = None) -> dict:
    """``benchmarks/scaling_child.py`` per size: exact Fisher trace, ``check_aic`` (d = 10,
    Gauss–Newton matvec, Lanczos, 60 steps) and ``taylor_onset`` to order 6, each run twice (the
    first with compilation), and the child's peak resident memory (``getrusage``)."""
    import os
    import subprocess

    env = os.environ.get("QUARTIC_SCALING_SIZES")  # e.g. "10m,30m" (benchmarks/gpu.sh)
    sizes = sizes or (tuple(env.split(",")) if env else ("2k", "100k") if quick else ("1m",))
    rows = []
    for size in sizes:
        proc = subprocess.run(
            [sys.executable, str(HERE / "scaling_child.py"), size, "6"],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(
            f"scaling {size}: n={row['n']} aic {row['aic_check']['s']:.1f}s "
            f"(first {row['aic_check']['first_s']:.1f}s), taylor-6 {row['taylor_onset']['s']:.1f}s "
            f"(first {row['taylor_onset']['first_s']:.1f}s), peak {row['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# 5. quartic-law sweep: trajectories per second


def bench_sweep(quick: bool) -> dict:
    spec = problems.QuadraticSpec()  # n=40, d=4
    times = dynamics.log_times(1e-3, 1e-1, 32)
    num = 32 if quick else 128

    def run(key):
        prob, basis = problems.make_quadratic(key, spec)
        obs = dynamics.make_observer(
            prob.align_loss_fn, prob.theta_star, basis, delta_u_fn=prob.delta_u
        )
        traj = dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, times, obs, substeps=16)
        return traj.observables["delta_u"]

    keys = jax.random.split(jax.random.PRNGKey(0), num)
    one = jax.jit(run)
    t0 = time.perf_counter()
    one.lower(keys[0]).compile()
    one_compile = time.perf_counter() - t0
    jax.block_until_ready(one(keys[0]))
    t0 = time.perf_counter()
    outs = [one(k) for k in keys]
    jax.block_until_ready(outs)
    single_s = time.perf_counter() - t0
    batched = time_jit(jax.vmap(run), keys, repeats=3)
    same = float(
        np.abs(np.stack([np.asarray(o) for o in outs]) - np.asarray(jax.vmap(run)(keys))).max()
    )
    row = {
        "problem": {"n": spec.n, "d": spec.d},
        "record_times": len(times),
        "rk4_substeps": 16,
        "num_trajectories": num,
        "single_s": single_s,
        "single_compile_s": one_compile,
        "single_traj_per_s": num / single_s,
        "vmapped_s": batched.median_s,
        "vmapped_compile_s": batched.compile_s,
        "vmapped_traj_per_s": num / batched.median_s,
        "speedup": single_s / batched.median_s,
        "max_abs_diff": same,
    }
    log(
        f"sweep: single {row['single_traj_per_s']:.0f}/s, vmapped {row['vmapped_traj_per_s']:.0f}/s"
    )
    return row


# ----------------------------------------------------------------------------------------------
# 6. peers


def bench_peers(quick: bool) -> dict:
    from peers import compare

    avail = compare.available()
    out: dict = {"available": avail}
    if avail["torch"] is None:
        msg = "torch is not installed: peers skipped (pip install -e '.[peers]')"
        log(msg)
        out["skipped"] = msg
        return out
    import torch

    out["torch_threads"] = torch.get_num_threads()
    if avail["pyhessian"] is None:
        out["pyhessian"] = {"skipped": "pyhessian is not installed"}
    else:
        if ("hessian", "2k") not in _cache:
            prob = make_problem("2k", "float64", batch_size=16)
            f, theta, _ = flat_loss(prob)
            _cache[("hessian", "2k")] = (prob, np.asarray(curvature.dense_hessian(f, theta, 64)))
        prob, h = _cache[("hessian", "2k")]
        out["pyhessian"] = compare.pyhessian_vs_lanczos(prob, lm_loss, h, quick)
        p = out["pyhessian"]
        log(
            f"pyhessian: {p['pyhessian']['time_s']:.2f}s err {p['pyhessian']['err']:.1e}; "
            f"speedup at equal accuracy {p['speedup_at_equal_accuracy']}, accuracy gain at equal "
            f"time {p['accuracy_gain_at_equal_time']}"
        )
    if avail["alignment_risk"] is None:
        out["alignment_risk"] = {"skipped": "alignment-risk is not installed"}
    else:
        seeds = range(3) if quick else range(8)
        out["alignment_risk"] = [
            compare.alignment_risk_vs_quartic(seeds, problems.QuadraticSpec(), 1e-3, thr, 2000)
            for thr in (1e-6, 1e-9)
        ]
        log("alignment-risk: done")
    return out


# ----------------------------------------------------------------------------------------------
# Table


def _f(x, fmt="{:.3g}"):
    return "—" if x is None else fmt.format(x)


def _ok(flag):
    return "n/a" if flag is None else ("**yes**" if flag else "**no**")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# quartic benchmarks — {m['device']}",
        "",
        f"`{res['command']}` · jax {m['jax']} · {m.get('cpu_model') or m['backend']} · "
        f"commit {m.get('git_commit')} · {res['date']} · last invocation {res['total_s']:.0f} s"
        + (" · **quick mode**" if res["quick"] else ""),
        "",
        "Sections measured by: "
        + "; ".join(
            f"{k} (`{v['_measured']['command']}`, {v['_measured']['date']})"
            for k, v in res["sections"].items()
            if isinstance(v, dict) and "_measured" in v
        )
        + ".",
        "",
        "Medians of repeats after `block_until_ready`; compile time separate; ratios against a "
        "baseline timed in the same process (interleaved where both are jitted).",
        "",
    ]
    acc: list[tuple[str, str, str]] = []
    s = res["sections"]
    if "hvp" in s and "rows" in s["hvp"]:
        lines += [
            "## Gradient vs Hessian-vector product (transformer LM, float32, batch 16×16)",
            "",
            "| model | n | grad (ms) | HVP (ms) | HVP / grad | linearized HVP (ms) | lin. / grad | compile grad / HVP (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["hvp"]["rows"]:
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['grad_s'] * 1e3:.2f} | {r['hvp_s'] * 1e3:.2f} | "
                f"{r['hvp_over_grad']:.2f} | {r['hvp_linearized_s'] * 1e3:.2f} | "
                f"{r['hvp_linearized_over_grad']:.2f} | {r['compile_s']['grad']:.1f} / "
                f"{r['compile_s']['hvp']:.1f} |"
            )
        worst = max(r["hvp_over_grad"] for r in s["hvp"]["rows"])
        acc.append(("HVP ≤ 3× gradient, every size", f"worst {worst:.2f}×", _ok(worst <= 3)))
        lines.append("")
    if "train" in s and "rows" in s["train"]:
        lines += [
            "## Training steps: donated vs kept state (`quartic.core.train.train`, Adam, float32)",
            "",
            "One compiled chunk of 20 steps (batch 16 of 256 rows); *donated* = parameters and "
            "optimizer state given to the program (`donate_argnums`), which writes the new state "
            "into them; *kept* = the inputs stay alive. Peak = XLA buffer assignment (arguments + "
            "outputs + temporaries − aliased).",
            "",
            "| model | n | state MB | ms / step donated | ms / step kept | donated / kept | peak MB donated / kept |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["train"]["rows"]:
            pk = r["peak_bytes"]
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['state_bytes'] / 1e6:.1f} | "
                f"{r['step_s']['donated'] * 1e3:.2f} | {r['step_s']['kept'] * 1e3:.2f} | "
                f"{r['donated_over_kept']:.2f} | "
                f"{_f(pk['donated'] and pk['donated'] / 1e6, '{:.1f}')} / "
                f"{_f(pk['kept'] and pk['kept'] / 1e6, '{:.1f}')} |"
            )
        lines.append("")
    if "dense" in s and "rows" in s["dense"]:
        lines += [
            "## Dense Hessian from HVPs (float64)",
            "",
            "`dense_hessian(f, θ, chunk)`: chunk 1 = the HVPs one at a time inside one program "
            "(`lax.map`), chunk > 1 = chunked `vmap` (best of 16 and 64 shown); baseline = n calls "
            "of a jitted one-shot HVP from Python. Peak = XLA buffer assignment.",
            "",
            "| model | n | chunked vmap (s) [chunk] | lax.map, chunk 1 (s) | n × jitted HVP, Python loop (s) | vmap vs loop | lax.map vs loop | peak MB vmap / lax.map | compile vmap (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["dense"]["rows"]:
            pb, ps = r["batched_peak_bytes"], r["sequential_map_peak_bytes"]
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['batched_s']:.2f} [{r['chunk_size']}] | "
                f"{r['sequential_map_s']:.2f} | {r['python_loop_s']:.2f} | "
                f"{r['speedup_vs_python_loop']:.2f}× | "
                f"{r['sequential_map_speedup_vs_python_loop']:.2f}× | "
                f"{_f(pb and pb / 1e6, '{:.0f}')} / {_f(ps and ps / 1e6, '{:.0f}')} | "
                f"{r['batched_compile_s']:.1f} |"
            )
        r2 = s["dense"]["rows"][0]
        acc.append(
            (
                f"batched dense Hessian ≥ 2× faster than n sequential HVPs (n={r2['n']})",
                f"chunked vmap {r2['speedup_vs_python_loop']:.2f}×, lax.map "
                f"{r2['sequential_map_speedup_vs_python_loop']:.2f}× vs the Python loop",
                _ok(
                    max(r2["speedup_vs_python_loop"], r2["sequential_map_speedup_vs_python_loop"])
                    >= 2
                ),
            )
        )
        lines.append("")
    if "lanczos" in s and "rows" in s["lanczos"]:
        lines += [
            "## Lanczos (full reorthogonalisation) vs dense `eigh` (float64): top-20 and bottom-5",
            "",
            "`eigh` = `numpy.linalg.eigvalsh` of the dense Hessian (values only, LAPACK), timed once; "
            "building the dense Hessian costs extra (previous table). Relative error = "
            "max_i |λ_i − λ_i^eigh| / |λ_i^eigh|.",
            "",
            "| model | n | Krylov m | HVPs | Lanczos (s) | eigh (s) | rel. err top-20 | rel. err bottom-5 | max residual top / bottom | compile (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in s["lanczos"]["rows"]:
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['num_iters']} | {r['num_hvps']} | "
                f"{r['lanczos_s']:.2f} | {r['eigh_s']:.2f} | {r['top20_rel_err']:.1e} | "
                f"{r['bottom5_rel_err']:.1e} | {r['top20_max_residual']:.1e} / "
                f"{r['bottom5_max_residual']:.1e} | {r['lanczos_compile_s']:.1f} |"
            )
        for size in sorted({r["size"] for r in s["lanczos"]["rows"]}):
            ok_rows = [
                r for r in s["lanczos"]["rows"] if r["size"] == size and r["num_hvps"] <= 300
            ]
            best = min(ok_rows, key=lambda r: max(r["top20_rel_err"], r["bottom5_rel_err"]))
            err = max(best["top20_rel_err"], best["bottom5_rel_err"])
            acc.append(
                (
                    f"Lanczos top-20 (+bottom-5) within 1e-8 of eigh, ≤ 300 HVPs (n={best['n']})",
                    f"{err:.1e} with {best['num_hvps']} HVPs, residual ≤ "
                    f"{max(best['top20_max_residual'], best['bottom5_max_residual']):.1e}",
                    _ok(err <= 1e-8),
                )
            )
        lines.append("")
    big = s.get("lanczos_1m")
    if big and "core" in big:
        lines += [
            f"## Lanczos top-20 at n = {big['core']['n']:,} (float32, m = "
            f"{big['core']['num_iters']}, {big['core']['num_hvps']} HVPs incl. exact residuals)",
            "",
            "`core` = `curvature.lanczos_eigh` at the time of the run"
            + (
                "; `proposed` (older runs only) = the tridiagonalisation fix that the core has "
                "since adopted (no `lax.cond` on the basis, fresh vector only on breakdown)."
                if "proposed" in big
                else "."
            ),
            "",
            "| variant | time (s) | compile (s) | max residual (relative) | XLA peak MB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        variants = [v for v in ("core", "proposed") if v in big]
        for v in variants:
            r = big[v]
            lines.append(
                f"| {v} | {r['lanczos_s']:.1f} | {r['lanczos_compile_s']:.1f} | "
                f"{r['top20_max_residual']:.1e} ({r['top20_max_rel_residual']:.1e}) | "
                f"{_f(r['lanczos_peak_bytes'] and r['lanczos_peak_bytes'] / 1e6, '{:.0f}')} |"
            )
        lines.append("")
        if "max_rel_diff_core_vs_proposed" in big:
            agree = big["max_rel_diff_core_vs_proposed"]
            lines += [f"Top-20 of the two agree to {agree:.1e} (relative).", ""]
        for v in variants:
            acc.append(
                (
                    f"top-20 at 1M params < 60 s ({v})",
                    f"{big[v]['lanczos_s']:.1f} s",
                    _ok(big[v]["lanczos_s"] < 60),
                )
            )
    if "aic" in s and "rows" in s["aic"]:
        lines += [
            "## AIC check end to end (`check_aic`, rank 8, transformer)",
            "",
            "F: the LM loss's Hessian (indefinite at random init: the dense path's full `eigh`) "
            "or its Gauss–Newton Fisher (PSD: the dense path's partial eigensolver).",
            "",
            "| model | n | dtype | method | F | wall (s) | of which compiling (s) | rest (s) |",
            "| --- | ---: | --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in s["aic"]["rows"]:
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['dtype']} | {r['method']} | "
                f"{r.get('curvature', 'hessian')} | {r['wall_s']:.2f} | "
                f"{r['compile_s']:.2f} | {r['run_s']:.2f} |"
            )
        lines.append("")
    if "scaling" in s and "rows" in s["scaling"]:
        lines += [
            "## Scaling study: matrix-free AIC (d = 10) and Taylor onset (order 6), child process",
            "",
            "| model | n | exact trace (s) | AIC check (s) [first] | Taylor-6 (s) [first] | peak RSS"
            " (GiB) [10⁹ bytes] | ≤ 5 min, ≤ 5 min, ≤ 8 GiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in s["scaling"]["rows"]:
            aic_s, tay_s = r["aic_check"], r["taylor_onset"]
            gib = r["peak_rss_bytes"] / 2**30
            ok = aic_s["first_s"] <= 300 and tay_s["first_s"] <= 300 and gib <= 8
            lines.append(
                f"| {r['size']} | {r['n']:,} | {r['exact_trace']['s']:.1f} | {aic_s['s']:.1f} "
                f"[{aic_s['first_s']:.1f}] | {tay_s['s']:.1f} [{tay_s['first_s']:.1f}] | "
                f"{gib:.2f} [{r['peak_rss_bytes'] / 1e9:.2f}] | {_ok(ok)} |"
            )
        lines.append("")
    if "sweep" in s and "single_s" in s["sweep"]:
        r = s["sweep"]
        lines += [
            "## Quartic-law sweep: gradient-flow trajectories per second",
            "",
            f"Quadratic problems n = {r['problem']['n']}, d = {r['problem']['d']}, "
            f"{r['record_times']} record times × {r['rk4_substeps']} RK4 substeps, "
            f"{r['num_trajectories']} seeds.",
            "",
            "| mode | trajectories / s | compile (s) |",
            "| --- | ---: | ---: |",
            f"| one jitted run per seed | {r['single_traj_per_s']:.1f} | {r['single_compile_s']:.1f} |",
            f"| `vmap` over seeds | {r['vmapped_traj_per_s']:.1f} | {r['vmapped_compile_s']:.1f} |",
            "",
            f"Speed-up {r['speedup']:.1f}×; max |difference| between the two {r['max_abs_diff']:.1e}.",
            "",
        ]
    if "peers" in s:
        p = s["peers"]
        lines += ["## Peers, same process", ""]
        if "skipped" in p:
            lines += [p["skipped"], ""]
        ph = p.get("pyhessian", {})
        if "pyhessian" in ph:
            lines += [
                f"### PyHessian {p['available']['pyhessian']} (torch {p['available']['torch']}, "
                f"{p.get('torch_threads')} threads) vs quartic Lanczos — top-5 Hessian eigenvalues",
                "",
                f"The same transformer (n = {ph['n']:,}, float64) with the same weights: torch port "
                f"max |Δlogit| = {ph['port_max_logit_diff']:.1e}, loss {ph['loss_torch']:.12f} "
                f"(torch) vs {ph['loss_jax']:.12f} (JAX). Error = max |Δλ| / |λ|max against dense "
                f"`eigh`; for PyHessian the smaller of its error against the algebraic top-5 and "
                f"against the 5 largest in magnitude (λ_min = {ph['exact_min']:.3g}).",
                "",
                "Time = one call, amortised (quartic: after compilation; PyHessian has none). "
                "One-shot = what a single call costs a user: quartic's compilation plus one run.",
                "",
                "| method | HVPs | time (s) | compile (s) | one-shot (s) | rel. error | max residual |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                f"| PyHessian `eigenvalues(top_n=5)` (defaults) | — | "
                f"{ph['pyhessian']['time_s']:.3f} | — | {ph['pyhessian']['time_s']:.3f} | "
                f"{ph['pyhessian']['err']:.1e} | — |",
            ]
            for o in ph["quartic_lanczos"]:
                lines.append(
                    f"| quartic Lanczos m = {o['num_iters']} | {o['num_hvps']} | {o['time_s']:.3f} | "
                    f"{o['compile_s']:.1f} | {o['compile_s'] + o['time_s']:.1f} | "
                    f"{o['err']:.1e} | {o['max_residual']:.1e} |"
                )
            sp, ag = ph["speedup_at_equal_accuracy"], ph["accuracy_gain_at_equal_time"]
            lines += [""]
            # quartic's times are after compilation (amortised); PyHessian's include everything
            in_time = [o for o in ph["quartic_lanczos"] if o["time_s"] <= ph["pyhessian"]["time_s"]]
            best = min((o["err"] for o in in_time), default=None)
            acc.append(
                (
                    "vs PyHessian: ≥ 5× faster at equal or better accuracy (quartic compiled "
                    "beforehand, amortised; its compilation is not counted)",
                    _f(sp, "{:.1f}×"),
                    _ok(sp is not None and sp >= 5),
                )
            )
            ok = [o for o in ph["quartic_lanczos"] if o["err"] <= ph["pyhessian"]["err"]]
            first = min((o["compile_s"] + o["time_s"] for o in ok), default=None)
            one_shot = "—"
            if first is not None:
                one_shot = f"{first:.1f} / {ph['pyhessian']['time_s']:.2f}"
                if first > ph["pyhessian"]["time_s"]:
                    one_shot += " (quartic slower one-shot)"
            acc.append(
                (
                    "vs PyHessian, one-shot (quartic's compilation counted), at equal or better "
                    "accuracy: quartic / PyHessian seconds",
                    one_shot,
                    "reported",
                )
            )
            acc.append(
                (
                    "vs PyHessian: more accurate at equal time (errors: PyHessian / quartic)",
                    f"{ph['pyhessian']['err']:.1e} / {_f(best, '{:.1e}')}"
                    + (" (float64 floor)" if best is not None and best < 1e-13 else ""),
                    _ok(ag is not None and ag >= 100),
                )
            )
        ar = p.get("alignment_risk")
        if isinstance(ar, list):
            lines += [
                f"### alignment-risk {p['available']['alignment_risk']} vs quartic — collapse "
                "step on quadratic problems (gradient descent, exact simulation)",
                "",
                "alignment-risk gets an empirical Fisher equal to the exact rank-d F (best case). "
                "Step error = |k_pred − k_exact| / k_exact; curve ratio = predicted Δu / exact Δu at "
                "the exact collapse step (1 is perfect).",
                "",
                "| threshold | seed | exact step | alignment-risk step (err) | quartic forecast step (err) | curve ratio alignment-risk | curve ratio quartic |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for block in ar:
                for r in block["rows"]:
                    lines.append(
                        f"| {block['threshold']:.0e} | {r['seed']} | {r['exact_collapse_step']} | "
                        f"{r['alignment_risk_collapse_step']} "
                        f"({_f(r['alignment_risk_step_rel_err'], '{:.1%}')}) | "
                        f"{r['quartic_forecast_collapse_step']} "
                        f"({_f(r['quartic_forecast_step_rel_err'], '{:.1%}')}) | "
                        f"{_f(r['alignment_risk_curve_ratio'], '{:.2f}')} | "
                        f"{_f(r['quartic_forecast_curve_ratio'], '{:.3f}')} |"
                    )
            for block in ar:
                ea = [
                    r["alignment_risk_step_rel_err"]
                    for r in block["rows"]
                    if r["alignment_risk_step_rel_err"] is not None
                ]
                eq = [
                    r["quartic_forecast_step_rel_err"]
                    for r in block["rows"]
                    if r["quartic_forecast_step_rel_err"] is not None
                ]
                if ea and eq:
                    acc.append(
                        (
                            f"vs alignment-risk: median collapse-step error, threshold "
                            f"{block['threshold']:.0e} (lr {block['lr']:g})",
                            f"alignment-risk {np.median(ea):.1%} · quartic {np.median(eq):.1%}",
                            "reported",
                        )
                    )
            lines.append("")
    first = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
    table = ["## Acceptance", "", "| target | measured | met |", "| --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in acc] + [""]
    lines = lines[:first] + table + lines[first:]
    errors = res.get("errors", {})
    if errors:
        lines += ["## Sections that failed", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _write(res: dict, out_dir: Path, name: str, only) -> dict:
    """Write the JSON and the table; a partial (``--only``) run merges its sections into the file
    as it is now (so two partial runs at once keep each other's sections)."""
    path = out_dir / f"{name}.json"
    if only is not None and path.exists():
        old = json.loads(path.read_text())
        merged = old.get("sections", {})
        merged.update({k: v for k, v in res["sections"].items() if k in only})
        errors = {k: v for k, v in old.get("errors", {}).items() if k not in only}
        errors.update(res["errors"])
        res = {**res, "sections": merged, "errors": errors}
    path.write_text(json.dumps(res, indent=1, default=float))
    (out_dir / f"{name}.md").write_text(markdown(res))  # a killed run keeps what it measured
    return res


def _timeout(signum, frame):
    raise TimeoutError("section exceeded --section-timeout (hung?)")


def update_docs(md_path: Path, doc_path: Path = HERE.parent / "docs" / "performance.md") -> None:
    """Copy a results table into ``docs/performance.md`` between its RESULTS markers."""
    import re

    body = md_path.read_text().split("\n", 1)[1].lstrip("\n")  # drop the file's own title
    body = re.sub(r"^### ", "#### ", body, flags=re.M)
    body = re.sub(r"^## ", "### ", body, flags=re.M)
    doc = doc_path.read_text()
    start = doc.index("\n", doc.index("<!-- BEGIN RESULTS")) + 1
    end = doc.index("<!-- END RESULTS -->")
    doc_path.write_text(doc[:start] + "\n" + body + "\n" + doc[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (minutes)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder")
    ap.add_argument("--name", default=None, help="file name (default: the device name)")
    ap.add_argument(
        "--update-docs",
        metavar="MD",
        default=None,
        help="only copy the results table MD into docs/performance.md, then exit",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only rewrite OUT/NAME.md from OUT/NAME.json (no measurement), then exit",
    )
    ap.add_argument(
        "--section-timeout",
        type=int,
        default=1800,
        help="seconds before a section is abandoned as hung (reported as an error)",
    )
    args = ap.parse_args(argv)
    signal.signal(signal.SIGALRM, _timeout)
    if args.update_docs:
        update_docs(Path(args.update_docs))
        return 0
    only = SECTIONS if args.only is None else tuple(x.strip() for x in args.only.split(","))
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    name = args.name or common.device_name() + ("-quick" if args.quick else "")
    out_dir = Path(args.out)
    if args.render:
        path = out_dir / f"{name}.json"
        if not path.exists():
            ap.error(f"--render needs measured results, and {path} does not exist")
        (out_dir / f"{name}.md").write_text(markdown(json.loads(path.read_text())))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {
        "command": "python benchmarks/run.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else ""),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": common.machine_info(),
        "sections": {},
        "errors": {},
    }
    previous = out_dir / f"{name}.json"
    if args.only is not None and previous.exists():
        # a partial run updates the sections it ran and keeps the others (noted per section)
        old = json.loads(previous.read_text())
        res["sections"] = old.get("sections", {})
        res["errors"] = {k: v for k, v in old.get("errors", {}).items() if k not in only}
        res["runs"] = old.get("runs", []) + [old.get("command")]
    t_all = time.perf_counter()
    fns = {
        "hvp": bench_hvp,
        "train": bench_train,
        "dense": bench_dense,
        "lanczos": bench_lanczos,
        "lanczos_1m": bench_lanczos_1m,
        "aic": bench_aic,
        "scaling": bench_scaling,
        "sweep": bench_sweep,
        "peers": bench_peers,
    }
    for sec in SECTIONS:
        if sec not in only:
            continue
        log(f"== {sec}")
        t0 = time.perf_counter()
        signal.alarm(args.section_timeout)  # a hung section is reported, the others still run
        try:
            res["sections"][sec] = fns[sec](args.quick)
            res["sections"][sec]["_measured"] = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": res["command"],
            }
        except Exception as e:  # keep what the other sections measured
            traceback.print_exc()
            res["errors"][sec] = f"{type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        log(f"== {sec} took {time.perf_counter() - t0:.0f}s")
        res["total_s"] = time.perf_counter() - t_all
        _write(res, out_dir, name, only if args.only is not None else None)
    res["total_s"] = time.perf_counter() - t_all
    res = _write(res, out_dir, name, only if args.only is not None else None)
    log(f"wrote {out_dir / name}.json and .md ({res['total_s']:.0f}s)")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
