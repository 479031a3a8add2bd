# %% [markdown]
# # Thm 6.2 — curvature-driven drift into the sensitive subspace
#
# **Theorem 6.2** (arXiv:2602.15799). Under the AIC (Def 5.1) with leak ‖Pg‖ ≤ ε and coupling
# γ = ‖F^{1/2}PHg‖, the gradient flow θ̇ = −∇L_FT(θ) from θ* drifts into M quadratically:
#
#     ‖F^{1/2} P δ(t)‖ ≥ (γ/2) t² − ε t + O(t³),     δ(t) = θ(t) − θ*.
#
# Here ε is measured Fisher-weighted, ε_F = ‖F^{1/2}Pg‖ ≤ √λ₁ ‖Pg‖, so the bound is the triangle
# inequality on F^{1/2}Pδ = −t F^{1/2}Pg + (t²/2) F^{1/2}PHg + O(t³). On a quadratic L_FT the O(t³)
# tail is bounded explicitly by R(t) = √λ₁‖g‖ (e^{tΛ} − 1 − tΛ − (tΛ)²/2)/Λ, Λ = ‖H‖, and we check
# ‖F^{1/2}Pδ(t)‖ ≥ (γ/2)t² − εt − R(t) on the exact flow for ε = 0 and ε ≠ 0.

# %%
import os
import pathlib
import tempfile

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np

import quartic as q
from quartic.core import fitting, theory
from quartic.harness import plotting

OUT = pathlib.Path(os.environ.get("QUARTIC_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="quartic_"))
D = 3


def drift(leak, t_min):
    """The measured drift ‖F^{1/2}Pδ(t)‖, γ_F, ε_F and the rigorous O(t³) tail on one problem."""
    spec = q.QuadraticSpec(n=30, d=D, leak=leak, coupling=1.0)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(5), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=D)
    sq = jnp.sqrt(rep.eigenvalues[:D])
    lam = rep.lambda_max_ft  # H is positive definite here, so ‖H‖ = λ_max(H)
    ts = np.geomspace(t_min, 1.0, 60) / lam  # t·λ_max(H) from t_min to 1
    measured = np.asarray(jnp.linalg.norm(sq * (prob.flow(ts) @ rep.basis), axis=-1))
    eps_f = float(jnp.linalg.norm(sq * (rep.basis.T @ prob.ft_grad)))
    x = ts * lam
    tail = float(sq[0]) * rep.ft_grad_norm * (np.expm1(x) - x - x**2 / 2) / lam
    return rep, ts, measured, eps_f, tail


# %% [markdown]
# ## ε = 0: the drift is (γ/2)t² to leading order, with an O(t³) correction

# %%
rep0, ts, m0, eps0, tail0 = drift(leak=0.0, t_min=1e-4)
gamma0 = rep0.gamma_fisher
lb0 = np.asarray(theory.drift_lower_bound(ts, gamma0, eps0))
assert eps0 < 1e-12 and rep0.ortho_norm < 1e-12
assert np.all(m0 >= lb0 - tail0), "Thm 6.2 violated (ε = 0)"
small = ts * rep0.lambda_max_ft <= 1e-2
assert abs(fitting.fit_exponent(ts[small], m0[small]).exponent - 2) < 0.01
resid = np.abs(m0 - lb0)
assert abs(fitting.fit_exponent(ts[small], resid[small]).exponent - 3) < 0.05  # the O(t³) term
ratio0 = m0 / (0.5 * gamma0 * ts**2)
assert abs(ratio0[0] - 1) < 1e-3, ratio0[0]
print(f"ε = 0: γ_F = {gamma0:.4g}; drift/(γt²/2) at the smallest t = {ratio0[0]:.6f}")

# %% [markdown]
# ## ε ≠ 0: a first-order leak gives ε t at first; the curvature term (γ/2)t² overtakes it

# %%
rep1, ts1, m1, eps1, tail1 = drift(leak=1e-6, t_min=1e-8)
gamma1 = rep1.gamma_fisher
lb1 = np.asarray(theory.drift_lower_bound(ts1, gamma1, eps1))
assert eps1 > 0 and eps1 <= np.sqrt(rep1.eigenvalues[0]) * rep1.ortho_norm * (1 + 1e-12)
assert np.all(m1 >= lb1 - tail1), "Thm 6.2 violated (ε ≠ 0)"
t_pos = 2 * eps1 / gamma1  # where the bound becomes positive (non-trivial)
lam1 = rep1.lambda_max_ft
assert t_pos * lam1 < 1e-3, t_pos * lam1  # ... inside the expansion's validity
early, late = ts1 < t_pos / 30, (ts1 > 30 * t_pos) & (ts1 * lam1 < 1e-2)
assert abs(fitting.fit_exponent(ts1[early], m1[early]).exponent - 1) < 0.05  # ε t first
assert abs(fitting.fit_exponent(ts1[late], m1[late]).exponent - 2) < 0.05  # then Ω(γ t²)
print(f"ε_F = {eps1:.3g} (‖Pg‖ = {rep1.ortho_norm:.3g}); bound positive for t > 2ε/γ = {t_pos:.3g}")

# %%
fig, axes = plotting.figure(1, 2)
for ax, t, m, lb, title in (
    (axes[0, 0], ts, m0, lb0, "ε = 0"),
    (axes[0, 1], ts1, m1, lb1, f"ε_F = {eps1:.2g}"),
):
    ax.plot(t, m, label="‖F½Pδ(t)‖ (exact flow)")
    pos = lb > 0
    ax.plot(t[pos], lb[pos], "--", label="(γ/2)t² − εt")
    plotting.slope_guide(ax, t[pos], 0.2 * m[pos][-1] * (t[pos][0] / t[pos][-1]) ** 2, 2)
    plotting.loglog(ax, "t", "‖F½Pδ‖", f"Thm 6.2, {title}")
    ax.legend(fontsize=8)
axes[0, 1].axvline(t_pos, color="0.6", lw=0.8)
print("saved", plotting.save(fig, OUT / "thm62_drift.png"))
