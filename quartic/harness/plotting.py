"""Shared figure helpers: log-log axes with slope guides, saving. Figures are drawn from saved
results only (never recomputed here)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def slope_guide(ax, t, y_anchor: float, order: float, label: str | None = None, **kw):
    """A dashed ``t^order`` line through ``(t[0], y_anchor)`` over the range of ``t``."""
    t = np.asarray(t, float)
    kw = {"color": "0.5", "ls": ":", "lw": 1.2, **kw}
    ax.plot(t, y_anchor * (t / t[0]) ** order, label=label or f"slope {order:g}", **kw)


def decade_guide(ax, x0, y0, order, decades=1.0, label=None, **kw):
    """A dotted ``x^order`` segment from ``(x0, y0)`` over ``decades`` to the right, labelled at its
    end (default ``slope {order}``)."""
    xs = np.array([x0, x0 * 10**decades])
    ax.plot(xs, y0 * (xs / x0) ** order, color="k", lw=1, ls=":", **kw)
    ax.annotate(label or f"slope {order}", (xs[1], y0 * 10 ** (decades * order)), fontsize=8)


def loglog(ax, xlabel: str, ylabel: str, title: str | None = None):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def save(fig, path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def figure(nrows: int, ncols: int, size=(4.2, 3.4)):
    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
