"""Figures of the Van der Pol experiment (matplotlib, Agg backend): trajectories vs. the
``solve_ivp`` reference, phase portrait, loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_vdp", "plot_losses"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(history: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.array([h["step"] for h in history])
    for key in ("total", "physics", "ic", "data", "jacobian"):
        if history and key in history[0]:
            ax.semilogy(steps, [h[key] for h in history], label=key, lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss term (unweighted)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_vdp(cfg, ev: dict, history: list[dict], out: Path) -> dict[str, Path]:
    plt = _plt()
    out = Path(out)
    files = {"loss_plot": plot_losses(history, out / "vdp_loss.png")} if history else {}
    t, pred, ref = (ev["t"], ev["pred"], ev["ref"]) if cfg.setup == "pideq" else (ev["t"], ev["roll"], ev["ref_roll"])
    label = "PIDEQ" if cfg.setup == "pideq" else f"rollout (h = {cfg.horizon:g})"
    fig, axes = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(t, ref[:, i], "k-", lw=2.5, alpha=0.35, label="solve_ivp")
        ax.plot(t, pred[:, i], "C0--", lw=1.2, label=label)
        if "roll_skip" in ev:  # what the exact Taylor skip alone (network ≡ 0) would give
            ax.plot(t, ev["roll_skip"][:, i], "C3:", lw=0.8, label=f"Taylor skip alone (order {cfg.taylor})")
        ax.set_ylabel(f"$y_{i + 1}$")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("t")
    m = ev["metrics"]
    rel = m.get("rel_l2", m.get("rollout_rel_l2"))
    title = f"Van der Pol, μ = {cfg.mu:g}: relative L2 {rel:.2e}"
    if "skip_only_rollout_rel_l2" in m:
        title += f" (skip alone {m['skip_only_rollout_rel_l2']:.2e})"
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    files["trajectory_plot"] = out / "vdp_trajectory.png"
    fig.savefig(files["trajectory_plot"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if cfg.setup == "conditioned":
        for k, (p, r) in enumerate(zip(ev["pred"][:16], ev["ref"][:16])):
            ax.plot(r[:, 0], r[:, 1], "k-", lw=2.5, alpha=0.3, label="solve_ivp, held-out y0" if k == 0 else None)
            ax.plot(p[:, 0], p[:, 1], "C1-", lw=1, label=f"flow map over [0, {cfg.horizon:g}]" if k == 0 else None)
    ax.plot(ref[:, 0], ref[:, 1], "k-", lw=2.5, alpha=0.35, label=None if cfg.setup == "conditioned" else "solve_ivp")
    ax.plot(pred[:, 0], pred[:, 1], "C0--", lw=1.2, label=label)
    ax.set_xlabel("$y_1$")
    ax.set_ylabel("$y_2$")
    ax.set_title("phase portrait")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["phase_plot"] = out / "vdp_phase.png"
    fig.savefig(files["phase_plot"], dpi=90)
    plt.close(fig)
    return files
