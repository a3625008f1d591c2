"""Figures of the analysis tools (matplotlib, Agg backend: files only, no screen).

Every function takes the results of one tool and a path, writes a PNG and returns the path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["plot_residual_curves", "plot_trajectories", "plot_ntk", "plot_linear_rate", "plot_hessian",
           "plot_landscapes_2d", "plot_landscape_surfaces", "plot_landscapes_1d"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _grid(n: int, ncols: int | None = None, size=(4.0, 3.2)):
    plt = _plt()
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_residual_curves(curves: Mapping[str, "ResidualCurves"], path, *, ncols: int | None = None,  # noqa: F821
                         max_curves: int = 64) -> Path:
    """One panel per entry: thin per-input curves of eq. (4.2), the median and the 10–90 %
    and 25–75 % bands over inputs, log scale (thesis Fig. 4.1)."""
    fig, axes = _grid(len(curves), ncols)
    for ax, (name, c) in zip(axes, curves.items()):
        K = c.rel.shape[0]
        k = np.arange(K)
        rel = c.rel.numpy()
        for s in range(min(rel.shape[1], max_curves)):
            ax.plot(k, rel[:, s], color="tab:blue", alpha=0.15, lw=0.7)
        q = c.quantiles((0.1, 0.25, 0.5, 0.75, 0.9)).numpy()
        ax.fill_between(k, q[0], q[4], color="tab:orange", alpha=0.2, label="10–90 %")
        ax.fill_between(k, q[1], q[3], color="tab:orange", alpha=0.35, label="25–75 %")
        ax.plot(k, q[2], color="tab:red", lw=2, label="median")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("solver iteration k")
        ax.set_ylabel("‖f(z)−z‖ / ‖f(z)‖")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_trajectories(results: Mapping[str, dict], labels, path, *, ncols: int | None = None, max_inputs: int = 200) -> Path:
    """One PCA plane per checkpoint: trajectories z^[0] → z^[K] coloured by class, the final
    iterates marked (thesis Figs. 4.2, 4.3)."""
    plt = _plt()
    labels = np.asarray(labels)
    cmap = plt.get_cmap("tab10")
    fig, axes = _grid(len(results), ncols, size=(4.0, 3.8))
    for ax, (name, r) in zip(axes, results.items()):
        xy = r["coords"].numpy()  # (K, S, 2)
        for s in range(min(xy.shape[1], max_inputs)):
            color = cmap(int(labels[s]) % 10)
            ax.plot(xy[:, s, 0], xy[:, s, 1], color=color, alpha=0.35, lw=0.7)
            ax.scatter(xy[-1, s, 0], xy[-1, s, 1], color=color, s=6)
        ev = r["explained"]
        ax.set_title(f"{name}  (PC var {float(ev[0]):.0%}, {float(ev[1]):.0%})", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    handles = [plt.Line2D([], [], color=cmap(c), lw=2, label=str(c)) for c in sorted(set(labels.tolist()))]
    axes[0].legend(handles=handles, fontsize=6, ncol=2, title="class", title_fontsize=7)
    return _save(fig, path)


def plot_ntk(spectra: Mapping[str, Sequence[float]], track: Sequence[dict], path) -> Path:
    """Left: NTK eigen-spectra per checkpoint (log scale). Right: λ_min(Θ), λ_max(Θ)/scale and
    σ_min(Z)² over training."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, ev in spectra.items():
        ev = np.clip(np.asarray(ev), 1e-300, None)
        a1.plot(np.arange(1, len(ev) + 1), ev, label=name)
    a1.set_yscale("log")
    a1.set_xscale("log")
    a1.set_xlabel("index")
    a1.set_ylabel("eigenvalue of Θ")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    x = [t["epoch"] for t in track]
    a2.plot(x, [t["lambda_min"] for t in track], "o-", label="λ_min(Θ)")
    a2.plot(x, [t["lambda_max"] for t in track], "s-", label="λ_max(Θ)")
    sig = [(e, t["sigma_min_Z"] ** 2) for e, t in zip(x, track) if t["sigma_min_Z"] > 0]
    if sig:
        a2.plot(*zip(*sig), "^-", label="σ_min(Z)² (λ₀²)")
    if len(sig) < len(track):
        a2.set_title("σ_min(Z) = 0 (Z rank deficient or width < N) at some checkpoints", fontsize=8)
    a2.set_yscale("log")
    a2.set_xlabel("epoch")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    return _save(fig, path)


def plot_linear_rate(check: dict, path) -> Path:
    """Training loss of GD against the bounds of Theorems 3.3.5 and 3.3.1."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    k = np.arange(len(check["loss"]))
    a1.plot(k, check["loss"], lw=2, label="L(θ(k)) (gradient descent)")
    a1.plot(k, check["bound_discrete"], "--", label="(1 − ηλ₀²/4)^k L(0)  (Thm 3.3.5)")
    a1.plot(k, check["bound_continuous"], ":", label="exp(−λ₀² ηk/2) L(0)  (Thm 3.3.1)")
    a1.set_yscale("log")
    a1.set_xlabel("GD step k")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    th = check.get("theorem", {})
    a1.set_title(f"λ₀ = {check['lambda_0']:.3g}; bound holds: {check['bound_holds']}; "
                 f"conditions hold: {th.get('all_hold')}", fontsize=8)
    a2.plot(k, check["sigma_min_Z"], label="σ_min(Z(k))")
    a2.axhline(check["lambda_0"] / 2, color="gray", ls="--", label="λ₀/2 (hypothesis 2)")
    a2.set_xlabel("GD step k")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    return _save(fig, path)


def plot_hessian(track: Sequence[dict], path, terms=("total", "gauss_newton", "dynamics")) -> Path:
    """Top eigenvalues of each Hessian term over training (one panel per term)."""
    fig, axes = _grid(len(terms), len(terms))
    x = [t["epoch"] for t in track]
    for ax, term in zip(axes, terms):
        ev = np.array([t[term] for t in track])  # (checkpoints, k)
        for j in range(ev.shape[1]):
            ax.plot(x, ev[:, j], "o-", lw=1.5 if j == 0 else 0.8, label=f"λ_{j + 1}")
        ax.set_title({"total": "total H", "gauss_newton": "Gauss–Newton (Term A)",
                      "dynamics": "dynamics (Term B)"}[term], fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_landscapes_2d(lands: Mapping[str, "Landscape"], path, *, levels: int = 30, vmax: float | None = None) -> Path:  # noqa: F821
    """Contour plots of Φ(α, β) side by side with shared levels (thesis Fig. 4.4)."""
    fig, axes = _grid(len(lands), size=(3.8, 3.5))
    vmax = vmax if vmax is not None else max(float(torch.nan_to_num(l.loss, nan=-1).max()) for l in lands.values())
    vmin = min(float(l.loss[torch.isfinite(l.loss)].min()) for l in lands.values())
    lv = np.linspace(vmin, vmax, levels)
    for ax, (name, l) in zip(axes, lands.items()):
        A, B = np.meshgrid(l.alphas.numpy(), l.betas.numpy(), indexing="ij")
        cs = ax.contour(A, B, np.clip(l.loss.numpy(), None, vmax), levels=lv, cmap="viridis", linewidths=0.8)
        ax.clabel(cs, cs.levels[::6], fontsize=6, fmt="%.2f")
        ax.plot(0, 0, "r+", ms=8)
        ax.set_title(f"{name} (L* = {l.center_loss:.3f})", fontsize=9)
        ax.set_aspect("equal")
    return _save(fig, path)


def plot_landscape_surfaces(lands: Mapping[str, "Landscape"], path, *, vmax: float | None = None) -> Path:  # noqa: F821
    """3D surfaces of Φ(α, β), shared z-range."""
    plt = _plt()
    n = len(lands)
    fig = plt.figure(figsize=(4.0 * n, 3.6))
    vmax = vmax if vmax is not None else max(float(torch.nan_to_num(l.loss, nan=-1).max()) for l in lands.values())
    for i, (name, l) in enumerate(lands.items()):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        A, B = np.meshgrid(l.alphas.numpy(), l.betas.numpy(), indexing="ij")
        ax.plot_surface(A, B, np.clip(l.loss.numpy(), None, vmax), cmap="viridis", linewidth=0, antialiased=True)
        ax.set_zlim(0, vmax)
        ax.set_title(name, fontsize=9)
    return _save(fig, path)


def plot_landscapes_1d(lands: Mapping[str, "Landscape"], path) -> Path:  # noqa: F821
    """Φ(α) of every model on one axis (loss, and accuracy when known)."""
    plt = _plt()
    has_acc = any(l.accuracy is not None for l in lands.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6), squeeze=False)
    for name, l in lands.items():
        axes[0, 0].plot(l.alphas.numpy(), l.loss.numpy(), label=name)
        if has_acc and l.accuracy is not None:
            axes[0, 1].plot(l.alphas.numpy(), l.accuracy.numpy(), label=name)
    axes[0, 0].set_xlabel("α")
    axes[0, 0].set_ylabel("loss Φ(α)")
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].grid(alpha=0.3)
    if has_acc:
        axes[0, 1].set_xlabel("α")
        axes[0, 1].set_ylabel("accuracy")
        axes[0, 1].grid(alpha=0.3)
    return _save(fig, path)
