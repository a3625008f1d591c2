"""Figures of the analysis tools (matplotlib, Agg backend: files only, no screen).

Every function takes the results of one tool and a path, writes a PNG and returns the path.
Conventions: every axis is labelled (with its unit where it has one: losses are cross-entropies
in nats, α and β are multiples of the filter-normalized directions, residuals and eigenvalues are
dimensionless), symbols are mathtext (``$\\lambda_1$``), epoch axes have integer ticks, lines that
can overlap differ in style as well as colour, legends sit outside the data where they could hide
it, and every colour map has a labelled colorbar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["plot_residual_curves", "plot_trajectories", "plot_ntk", "plot_linear_rate", "plot_hessian",
           "plot_landscapes_2d", "plot_landscape_surfaces", "plot_landscapes_1d", "integer_ticks", "LINE_STYLES"]

#: (linestyle, marker) pairs for lines that share an axis: distinguishable without colour
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"))

LOSS_LABEL = "loss Φ (cross-entropy, nats)"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis) -> None:
    """Integer-only major ticks on ``axis`` (e.g. ``ax.xaxis``), for epochs and steps."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _grid(n: int, ncols: int | None = None, size=(4.0, 3.2)):
    plt = _plt()
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _style(j: int) -> dict:
    ls, marker = LINE_STYLES[j % len(LINE_STYLES)]
    return dict(ls=ls, marker=marker, color=f"C{j % 10}")


def plot_residual_curves(curves: Mapping[str, "ResidualCurves"], path, *, ncols: int | None = None,  # noqa: F821
                         max_curves: int = 64) -> Path:
    """One panel per entry: thin per-input curves of eq. (4.2), the median and the 10–90 %
    and 25–75 % bands over inputs, log scale (Nguyen 2022, Fig. 4.1). The panel titles are the keys
    of ``curves`` (they should state σ of an N(0, σ²) initialization explicitly)."""
    plt = _plt()
    fig, axes = _grid(len(curves), ncols, size=(4.2, 3.2))
    for ax, (name, c) in zip(axes, curves.items()):
        K = c.rel.shape[0]
        k = np.arange(K)
        rel = c.rel.numpy()
        for s in range(min(rel.shape[1], max_curves)):
            ax.plot(k, rel[:, s], color="tab:blue", alpha=0.15, lw=0.7)
        q = c.quantiles((0.1, 0.25, 0.5, 0.75, 0.9)).numpy()
        ax.fill_between(k, q[0], q[4], color="tab:orange", alpha=0.2)
        ax.fill_between(k, q[1], q[3], color="tab:orange", alpha=0.35)
        ax.plot(k, q[2], color="tab:red", lw=2)
        ax.set_yscale("log")
        from matplotlib.ticker import NullFormatter

        ax.yaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels crowd short ranges
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(r"solver iteration $k$")
        ax.set_ylabel(r"$\|f(z^{[k]}) - z^{[k]}\| \,/\, \|f(z^{[k]})\|$")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    from matplotlib.patches import Patch

    handles = [plt.Line2D([], [], color="tab:blue", alpha=0.5, lw=0.7, label="single inputs"),
               plt.Line2D([], [], color="tab:red", lw=2, label="median over inputs"),
               Patch(color="tab:orange", alpha=0.35, label="25–75 % of inputs"),
               Patch(color="tab:orange", alpha=0.2, label="10–90 % of inputs")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    return _save(fig, path)


def plot_trajectories(results: Mapping[str, dict], labels, path, *, ncols: int | None = None, max_inputs: int = 200) -> Path:
    """One PCA plane per checkpoint: trajectories z^[0] → z^[K] coloured by class, the final
    iterates marked (Nguyen 2022, Figs. 4.2, 4.3). The class legend sits outside the panels."""
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
        ax.set_title(f"{name}  (PC variance {float(ev[0]):.0%}, {float(ev[1]):.0%})", fontsize=9)
        ax.set_xlabel(r"PC 1 of $z^{[k]}$")
        ax.set_ylabel(r"PC 2 of $z^{[k]}$")
    handles = [plt.Line2D([], [], color=cmap(c), lw=2, label=str(c)) for c in sorted(set(labels.tolist()))]
    handles.append(plt.Line2D([], [], color="gray", marker="o", ls="none", ms=3, label=r"final iterate $z^{[K]}$"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7, title="class", title_fontsize=8)
    return _save(fig, path)


def plot_ntk(spectra: Mapping[str, Sequence[float]], track: Sequence[dict], path) -> Path:
    """Left: NTK eigen-spectra per checkpoint (log-log). Right: λ_min(Θ), λ_max(Θ) and
    σ_min(Z)² over training (integer epoch ticks)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.8), layout="constrained")
    for j, (name, ev) in enumerate(spectra.items()):
        ev = np.clip(np.asarray(ev), 1e-300, None)
        st = _style(j)
        a1.plot(np.arange(1, len(ev) + 1), ev, ls=st["ls"], color=st["color"], label=name)
    a1.set_yscale("log")
    a1.set_xscale("log")
    a1.set_xlabel(r"eigenvalue index $i$ (descending)")
    a1.set_ylabel(r"eigenvalue $\lambda_i(\Theta)$")
    a1.set_title("NTK spectrum per checkpoint", fontsize=9)
    a1.legend(fontsize=7, loc="lower left")
    a1.grid(alpha=0.3)
    x = [t["epoch"] for t in track]
    a2.plot(x, [t["lambda_min"] for t in track], **_style(0), label=r"$\lambda_{\min}(\Theta)$")
    a2.plot(x, [t["lambda_max"] for t in track], **_style(1), label=r"$\lambda_{\max}(\Theta)$")
    sig = [(e, t["sigma_min_Z"] ** 2) for e, t in zip(x, track) if t["sigma_min_Z"] > 0]
    if sig:
        a2.plot(*zip(*sig), **_style(2), label=r"$\sigma_{\min}(Z)^2 = \lambda_0^2$")
    title = "extreme eigenvalues over training"
    if len(sig) < len(track):
        title += "\n" + r"($\sigma_{\min}(Z) = 0$ at some epochs: not drawn)"
    a2.set_title(title, fontsize=9)
    a2.set_yscale("log")
    a2.set_xlabel("epoch")
    a2.set_ylabel(r"eigenvalue of $\Theta$")
    integer_ticks(a2.xaxis)
    a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    a2.grid(alpha=0.3)
    return _save(fig, path)


def plot_linear_rate(check: dict, path) -> Path:
    """Training loss of GD against the bounds of Theorems 3.3.5 and 3.3.1 (Nguyen 2022).

    The two bounds decay by nearly the same tiny factor per step, so on the loss axis they lie
    almost on top of each other; the middle panel shows the decrease each guarantees,
    1 − B(k)/L(0) (log scale), where they separate, next to the decrease the run achieved."""
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.9), layout="constrained")
    k = np.arange(len(check["loss"]))
    loss = np.asarray(check["loss"], dtype=float)
    bd = np.asarray(check["bound_discrete"], dtype=float)
    bc = np.asarray(check["bound_continuous"], dtype=float)
    every = max(len(k) // 10, 1)
    lines = ((loss, dict(color="C0", ls="-", lw=2), r"$L(\theta(k))$ (gradient descent)"),
             (bd, dict(color="C3", ls="--", lw=1.8, marker="s", markevery=every, ms=4),
              r"$(1 - \eta\lambda_0^2/4)^k\,L(0)$ (Thm 3.3.5)"),
             (bc, dict(color="C2", ls=":", lw=2.2, marker="^", markevery=(every // 2, every), ms=4),
              r"$\exp(-\lambda_0^2\eta k/2)\,L(0)$ (Thm 3.3.1)"))
    for y, st, label in lines:
        a1.plot(k, y, label=label, **st)
    a1.set_yscale("log")
    a1.set_xlabel(r"gradient-descent step $k$")
    a1.set_ylabel(r"training loss $\frac{1}{2}\|\hat y - y\|^2$")
    a1.set_title("loss and its bounds", fontsize=9)
    a1.legend(fontsize=7, loc="lower left")
    a1.grid(alpha=0.3)
    for y, st, label in lines:
        drop = 1.0 - y[1:] / y[0]
        a2.plot(k[1:], np.where(drop > 0, drop, np.nan), label=label, **st)
    a2.set_yscale("log")
    a2.set_xlabel(r"gradient-descent step $k$")
    a2.set_ylabel(r"relative decrease $1 - L(k)/L(0)$")
    a2.set_title("decrease achieved vs guaranteed", fontsize=9)
    a2.legend(fontsize=7, loc="lower right")
    a2.grid(alpha=0.3)
    th = check.get("theorem", {})
    fig.suptitle(rf"$\lambda_0$ = {check['lambda_0']:.3g}, $\eta$ = {check['lr']:.3g}; loss below both bounds "
                 f"at every step: {check['bound_holds']}; theorem's conditions hold: {th.get('all_hold')}",
                 fontsize=9)
    a3.plot(k, check["sigma_min_Z"], color="C0", lw=2, label=r"$\sigma_{\min}(Z(k))$")
    a3.axhline(check["lambda_0"] / 2, color="gray", ls="--", label=r"$\lambda_0/2$ (hypothesis 2)")
    a3.set_xlabel(r"gradient-descent step $k$")
    a3.set_ylabel(r"$\sigma_{\min}(Z(k))$")
    a3.set_title("smallest singular value of the equilibria", fontsize=9)
    a3.legend(fontsize=7, loc="best")
    a3.grid(alpha=0.3)
    for ax in (a1, a2, a3):
        integer_ticks(ax.xaxis)
    return _save(fig, path)


def plot_hessian(track: Sequence[dict], path, terms=("total", "gauss_newton", "dynamics")) -> Path:
    """Top eigenvalues λ₁ ≥ λ₂ ≥ … of each Hessian term over training (one panel per term,
    integer epoch ticks, log scale when every value is positive)."""
    fig, axes = _grid(len(terms), len(terms), size=(4.2, 3.4))
    x = [t["epoch"] for t in track]
    for ax, term in zip(axes, terms):
        ev = np.array([t[term] for t in track], dtype=float)  # (checkpoints, k)
        for j in range(ev.shape[1]):
            name = rf"$\lambda_{j + 1}$" if j < 9 else rf"$\lambda_{{{j + 1}}}$"
            ax.plot(x, ev[:, j], **_style(j), lw=1.8 if j == 0 else 1.0, ms=5, label=name)
        ax.set_title({"total": r"total Hessian $H$", "gauss_newton": "Gauss–Newton part (Term A)",
                      "dynamics": "dynamics part (Term B)"}[term], fontsize=9)
        ax.set_yscale("log" if np.all(ev > 0) else "symlog")
        ax.set_xlabel("epoch")
        ax.set_ylabel(r"eigenvalue of $\nabla^2_\theta L$")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=ev.shape[1], fontsize=8)
    return _save(fig, path)


def _vrange(lands, vmax):
    vmax = vmax if vmax is not None else max(float(torch.nan_to_num(l.loss, nan=-1).max()) for l in lands.values())
    vmin = min(float(l.loss[torch.isfinite(l.loss)].min()) for l in lands.values())
    return vmin, max(vmax, vmin + 1e-12)


def plot_landscapes_2d(lands: Mapping[str, "Landscape"], path, *, levels: int = 30, vmax: float | None = None) -> Path:  # noqa: F821
    """Filled contour plots of Φ(α, β) side by side with shared levels and one colorbar
    (Nguyen 2022, Fig. 4.4)."""
    fig, axes = _grid(len(lands), size=(3.8, 3.6))
    vmin, vmax = _vrange(lands, vmax)
    lv = np.linspace(vmin, vmax, levels)
    cf = None
    for ax, (name, l) in zip(axes, lands.items()):
        A, B = np.meshgrid(l.alphas.numpy(), l.betas.numpy(), indexing="ij")
        Z = np.clip(l.loss.numpy(), None, vmax)
        cf = ax.contourf(A, B, Z, levels=lv, cmap="viridis", extend="neither")
        cs = ax.contour(A, B, Z, levels=lv[::3], colors="k", linewidths=0.4, alpha=0.6)
        ax.clabel(cs, cs.levels[::2], fontsize=6, fmt="%.2f")
        ax.plot(0, 0, "r+", ms=9, mew=2, label=r"trained $\theta^*$")
        ax.set_title(f"{name} ($L^*$ = {l.center_loss:.3f} nats)", fontsize=9)
        ax.set_xlabel(r"$\alpha$ (along $d_1$)")
        ax.set_ylabel(r"$\beta$ (along $d_2$)")
        ax.set_aspect("equal")
    cb = fig.colorbar(cf, ax=axes[:len(lands)], shrink=0.85)
    cb.set_label(r"loss $\Phi(\alpha, \beta)$ (cross-entropy, nats)")
    return _save(fig, path)


def plot_landscape_surfaces(lands: Mapping[str, "Landscape"], path, *, vmax: float | None = None) -> Path:  # noqa: F821
    """3D surfaces of Φ(α, β) with a shared z-range, colour scale and colorbar."""
    plt = _plt()
    from matplotlib.colors import Normalize

    n = len(lands)
    fig = plt.figure(figsize=(4.2 * n + 1.0, 3.9), layout="constrained")
    vmin, vmax = _vrange(lands, vmax)
    norm = Normalize(vmin, vmax)
    axes = []
    for i, (name, l) in enumerate(lands.items()):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        A, B = np.meshgrid(l.alphas.numpy(), l.betas.numpy(), indexing="ij")
        ax.plot_surface(A, B, np.clip(l.loss.numpy(), None, vmax), cmap="viridis", norm=norm, linewidth=0,
                        antialiased=True)
        ax.set_zlim(0, vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(r"$\alpha$", labelpad=-2)
        ax.set_ylabel(r"$\beta$", labelpad=-2)
        ax.set_zlabel(r"$\Phi$ (nats)", labelpad=-2)
        ax.tick_params(labelsize=7, pad=0)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        axes.append(ax)
    sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
    cb = fig.colorbar(sm, ax=axes, shrink=0.7, pad=0.02)
    cb.set_label(r"loss $\Phi(\alpha, \beta)$ (cross-entropy, nats)")
    return _save(fig, path)


def plot_landscapes_1d(lands: Mapping[str, "Landscape"], path) -> Path:  # noqa: F821
    """Φ(α) of every model on one axis (loss, and accuracy when known), one line style per model."""
    plt = _plt()
    has_acc = any(l.accuracy is not None for l in lands.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10.5 if has_acc else 5.5, 3.8), squeeze=False,
                             layout="constrained")
    for j, (name, l) in enumerate(lands.items()):
        st = dict(_style(j), markevery=max(len(l.alphas) // 10, 1), ms=4)
        axes[0, 0].plot(l.alphas.numpy(), l.loss.numpy(), label=name, **st)
        if has_acc and l.accuracy is not None:
            axes[0, 1].plot(l.alphas.numpy(), 100 * l.accuracy.numpy(), label=name, **st)
    axes[0, 0].set_xlabel(r"$\alpha$ (along the filter-normalized direction $d_1$)")
    axes[0, 0].set_ylabel(r"loss $\Phi(\alpha)$ (cross-entropy, nats)")
    axes[0, 0].grid(alpha=0.3)
    if has_acc:
        axes[0, 1].set_xlabel(r"$\alpha$ (along the filter-normalized direction $d_1$)")
        axes[0, 1].set_ylabel("accuracy (%)")
        axes[0, 1].grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return _save(fig, path)
