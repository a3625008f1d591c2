"""Figures of the Van der Pol experiment (matplotlib, Agg backend): trajectories vs. the
``solve_ivp`` reference, phase portrait, loss curves.

Conventions as in :mod:`deqdiff.analysis.plotting`: every axis labelled, overlapping lines
differ in style as well as colour, legends outside the data, integer step ticks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_vdp", "plot_losses"]

#: (linestyle, marker) of the loss terms; "total" is drawn wide and pale beneath the others
_TERM_STYLE = {"total": dict(color="0.55", ls="-", lw=3.5, alpha=0.5, zorder=1),
               "physics": dict(color="C0", ls="--", lw=1.3, zorder=3),
               "ic": dict(color="C1", ls=":", lw=1.5, zorder=3),
               "data": dict(color="C2", ls="-.", lw=1.2, zorder=3),
               "jacobian": dict(color="C4", ls=(0, (5, 1, 1, 1)), lw=1.2, zorder=3)}


_PHASE_NAMES = {"adam": "Adam", "lbfgs": "L-BFGS", "sgd": "SGD"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi: int = 90) -> Path:
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_losses(history: list[dict], path: Path, *, title: str = "Van der Pol PIDEQ: training losses") -> Path:
    """Unweighted loss terms per optimizer step (log scale), the total drawn wide and pale beneath
    the terms so that a term that dominates it stays visible; a vertical line marks each change of
    optimizer (e.g. Adam → L-BFGS, from the records' ``phase``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    steps = np.array([h["step"] for h in history])
    for key in ("total", "physics", "ic", "data", "jacobian"):
        if history and key in history[0]:
            ax.semilogy(steps, [h[key] for h in history], label=key, **_TERM_STYLE[key])
    phases = [h.get("phase") for h in history]
    for i in range(1, len(history)):
        if phases[i] != phases[i - 1]:
            x = 0.5 * (steps[i - 1] + steps[i])
            ax.axvline(x, color="k", ls=(0, (2, 2)), lw=0.9, zorder=2)
            names = [_PHASE_NAMES.get(str(n), str(n)) for n in (phases[i - 1], phases[i])]
            ax.annotate(" → ".join(names), xy=(x, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-4, -4), textcoords="offset points", ha="right", va="top", fontsize=8)
    ax.set_xlabel("optimizer step (one fresh batch each)")
    ax.set_ylabel("loss term (unweighted, mean square)")
    ax.set_title(title, fontsize=10)
    _integer_ticks(ax.xaxis)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_vdp(cfg, ev: dict, history: list[dict], out: Path, *, flows: int = 6) -> dict[str, Path]:
    """Loss curves, rollout trajectory y₁(t), y₂(t) vs ``solve_ivp`` and the phase portrait
    (with ``flows`` held-out short-horizon flows drawn over their references)."""
    plt = _plt()
    out = Path(out)
    files = {"loss_plot": plot_losses(history, out / "vdp_loss.png",
                                      title=f"Van der Pol (μ = {cfg.mu:g}), {cfg.setup}: training losses")} \
        if history else {}
    t, pred, ref = (ev["t"], ev["pred"], ev["ref"]) if cfg.setup == "pideq" else (ev["t"], ev["roll"], ev["ref_roll"])
    label = "PIDEQ" if cfg.setup == "pideq" else f"rollout (h = {cfg.horizon:g})"
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True, layout="constrained")
    for i, ax in enumerate(axes):
        ax.plot(t, ref[:, i], "k-", lw=2.5, alpha=0.35, label="solve_ivp (reference)")
        ax.plot(t, pred[:, i], "C0--", lw=1.2, label=label)
        if "roll_skip" in ev:  # what the exact Taylor skip alone (network ≡ 0) would give
            ax.plot(t, ev["roll_skip"][:, i], "C3:", lw=0.9, label=f"Taylor skip alone (order {cfg.taylor})")
        ax.set_ylabel(f"$y_{i + 1}$")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time $t$")
    m = ev["metrics"]
    rel = m.get("rel_l2", m.get("rollout_rel_l2"))
    title = f"Van der Pol, μ = {cfg.mu:g}: relative L2 {rel:.2e}"
    if "skip_only_rollout_rel_l2" in m:
        title += f" (skip alone {m['skip_only_rollout_rel_l2']:.2e})"
    fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    files["trajectory_plot"] = _save(fig, out / "vdp_trajectory.png")

    fig, ax = plt.subplots(figsize=(5.2, 5.6), layout="constrained")
    ax.plot(ref[:, 0], ref[:, 1], "k-", lw=2.5, alpha=0.3, zorder=1,
            label="solve_ivp (reference)" if cfg.setup != "conditioned" else "solve_ivp, rollout")
    ax.plot(pred[:, 0], pred[:, 1], "C0--", lw=1.2, zorder=2, label=label)
    if cfg.setup == "conditioned":
        # a few held-out flows, spread over the set; each reference drawn wide beneath its prediction
        pick = np.linspace(0, len(ev["pred"]) - 1, min(flows, len(ev["pred"]))).round().astype(int)
        for n, j in enumerate(pick):
            p, r = ev["pred"][j], ev["ref"][j]
            ax.plot(r[:, 0], r[:, 1], color="C3", lw=5, alpha=0.35, solid_capstyle="round", zorder=3,
                    label="solve_ivp, held-out y0" if n == 0 else None)
            ax.plot(p[:, 0], p[:, 1], color="C1", ls="-", lw=1.0, marker=".", ms=3, zorder=4,
                    label=f"flow map over [0, {cfg.horizon:g}]" if n == 0 else None)
            ax.plot(r[0, 0], r[0, 1], "o", mfc="none", mec="C3", ms=5, zorder=4,
                    label="held-out initial state" if n == 0 else None)
    ax.set_xlabel("$y_1$")
    ax.set_ylabel("$y_2$")
    ax.set_title("phase portrait", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    files["phase_plot"] = _save(fig, out / "vdp_phase.png")
    return files
