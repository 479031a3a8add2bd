# %% [markdown]
# # The transformer collapse in miniature, exactly
#
# A 2,184-parameter causal transformer (float64) is pretrained on quartic's token world and aligned
# to answer REFUSE on one harm category (θ*, `quartic.studies.training.make_aligned_model`). Everything
# below is exact: the true Fisher of the skill is a dense 2184 × 2184 matrix, the Taylor
# coefficients of Δu come from Taylor-mode AD (`theory.taylor_onsets`), and Δu is simulated along
# the gradient flow (RK4). The alignment loss is the **KL drift** from θ*'s own answers
# (docs/theory.md §3): its gradient at θ* is exactly 0 and its Hessian is exactly the Fisher, so the
# premise of the law holds by construction.
#
# A natural task leaks at first order (‖Pg‖/‖g‖ ≈ 0.3 on `sort`): Δu starts at t². The **controlled
# orthogonal variant** removes the part of g that the Fisher sees,
# L_FT'(θ) = L_FT(θ) − ⟨Πg, θ − θ*⟩ with Π onto the range of F; it keeps H, and the law's premises
# then hold exactly: c₁ = c₂ = c₃ = 0 and Δu = c₄t⁴ + O(t⁵). The full experiment with every task is
# `experiments/transformer_collapse.py`.

# %%
import os
import pathlib
import tempfile

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np

from quartic.core import curvature, dynamics, fitting, theory
from quartic.harness import plotting
from quartic.models import TransformerConfig
from quartic.studies import collapse
from quartic.studies.training import make_aligned_model
from quartic.tasks import token_world as tw

OUT = pathlib.Path(os.environ.get("QUARTIC_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="quartic_"))
world = tw.TokenWorld(tw.WorldConfig(seed=0))
cfg = TransformerConfig.preset(
    "2k", vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
)
# a θ* cache shared with other runs (the test suite sets one), else this run's own folder
CACHE = pathlib.Path(os.environ.get("QUARTIC_THETA_CACHE") or OUT / "cache")
aligned = make_aligned_model(cfg, world, seed=0, cache_dir=CACHE, progress=False)
print(
    {k: aligned.report[k] for k in ("grad_ratio",)}, aligned.report["after"]["harmfulness_heldout"]
)
setup = collapse.CollapseSetup(aligned.apply_fn, aligned.theta_star, world, category=0)
assert aligned.report["after"]["harmfulness_heldout"] == 0.0

# %% [markdown]
# ## The skill's Fisher: exact, and low-rank

# %%
F = collapse.dense_fisher(setup)
w, v = curvature.eigh_descending(F)
share = float(jnp.sum(w[:10]) / jnp.sum(w))
eff_rank = float(jnp.sum(w) ** 2 / jnp.sum(w**2))
print(f"n = {setup.n}; top-10 share of the trace {share:.3f}; effective rank {eff_rank:.1f}")
assert share > 0.5

# %% [markdown]
# ## The controlled orthogonal variant: exact Taylor coefficients

# %%
batch = setup.task_batch("sort")
g = jax.jit(jax.grad(setup.lm_fn))(setup.theta, batch)
k = int(jnp.sum(w > 1e-10 * w[0]))  # the numerical range of F
pi_g = v[:, :k] @ (v[:, :k].T @ g)
ft_data = (batch, pi_g, setup.theta)  # setup.ft_fn(θ, data) = L_FT(θ) − ⟨πg, θ − θ*⟩
print(
    f"natural task: ‖Pg‖/‖g‖ = {float(jnp.linalg.norm(v[:, :10].T @ g) / jnp.linalg.norm(g)):.3f}"
)
(onset,) = theory.taylor_onsets(
    (setup.align_fns["kl"],), setup.ft_fn, setup.theta, 4, ((setup.align_data["kl"],),), (ft_data,)
)
c = np.asarray(onset.coefficients)
print("c1..c4 =", c)
assert np.all(np.abs(c[:3]) <= 1e-8 * abs(c[3]))  # c₁ = c₂ = c₃ = 0 to float64 precision

# the paper's constant: γ_F = ‖F^½ P H g'‖ with P onto M (d = 10), g' = g − Πg
hvp = jax.jit(lambda x, d: curvature.hvp(lambda th: setup.ft_fn(th, d), setup.theta, x))
hg = hvp(g - pi_g, ft_data)
gamma_f = float(jnp.linalg.norm(jnp.sqrt(w[:10]) * (v[:, :10].T @ hg)))
print(f"c4 = {c[3]:.4e}; paper γ_F²/8 = {gamma_f**2 / 8:.4e}; ratio {c[3] / (gamma_f**2 / 8):.3f}")

# %% [markdown]
# ## Δu along the flow: slope 4, and Δu/(c₄t⁴) → 1
#
# λ_max(H_FT) sets the time scale (power iteration on the HVP, enough to place the window).

# %%
x = jnp.ones(setup.n) / setup.n**0.5
for _ in range(30):
    x = hvp(x, ft_data)
    lam = float(jnp.linalg.norm(x))
    x = x / lam
ts = np.geomspace(1e-2, 3.0, 10) / lam
flow = jax.jit(
    lambda ts, d, kl: dynamics.gradient_flow(
        lambda th: setup.ft_fn(th, d),
        setup.theta,
        ts,
        lambda th: {"kl": setup.align_fns["kl"](th, kl)},
        4,
    )
)
du = np.asarray(flow(jnp.asarray(ts), ft_data, setup.align_data["kl"]).checked().observables["kl"])
ratio = du / (c[3] * ts**4)
slope = fitting.local_slope(ts, du)
print("t·λ:", np.round(ts * lam, 3))
print("Δu/(c4 t^4):", np.round(ratio, 4))
print("local slope:", np.round(slope, 3))
assert abs(ratio[0] - 1) < 0.05 and abs(slope[0] - 4) < 0.2

fig, axes = plotting.figure(1, 2, size=(4.2, 3.2))
axes[0, 0].loglog(ts * lam, du, "o", ms=3, label="Δu (KL drift), simulated")
axes[0, 0].loglog(ts * lam, c[3] * ts**4, "-", label="c₄t⁴ (Taylor-mode)")
axes[0, 0].loglog(ts * lam, gamma_f**2 / 8 * ts**4, ":", label="γ_F²t⁴/8 (paper)")
axes[0, 0].set_xlabel("t·λ_max(H)")
axes[0, 0].legend(fontsize=7)
axes[0, 1].semilogx(ts * lam, slope)
axes[0, 1].axhline(4, color="0.6", ls="--")
axes[0, 1].set_xlabel("t·λ_max(H)")
axes[0, 1].set_ylabel("local slope")
plotting.save(fig, OUT / "transformer_collapse.png")
