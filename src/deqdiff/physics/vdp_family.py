"""The parametric Van der Pol family: one flow map ``y(Δ; y0, μ)`` for every μ in a range.

Trained by :func:`deqdiff.physics.vdp.run` with ``VdPConfig(mu_range=(lo, hi))`` (``deqdiff pinn
vdp --mu-range LO HI``): μ is drawn uniformly per collocation point, like Δ and the state. This
module evaluates such a model per μ against ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-11,
atol 1e-12) and draws the figures.

Evaluation values of μ (:func:`evaluation_mus`): five *held-out* values inside the range, the
midpoints of five equal sub-intervals (for [0.5, 2]: 0.65, 0.95, 1.25, 1.55, 1.85 — training
draws μ continuously, so no value is seen twice, but none of these is special), and two values
just *outside* it, ``lo − 0.1·(hi − lo)`` (if ≥ 0) and ``hi + 0.1·(hi − lo)``, reported
separately as extrapolation. Per μ:

* held-out flows: the ``n_test`` held-out initial states of the box (seed disjoint from
  training) × 21 offsets Δ ∈ [0, h]: relative L2 ``‖ŷ − y‖₂/‖y‖₂`` of y, of the increment
  ``y − y0`` and (Taylor skip) of the remainder ``y − T``;
* rollout ``y_{k+1} = y(h; y_k, μ)`` from ``y0 = (0, 0.1)`` to ``t = rollout_t_end`` (20):
  relative L2, IAE ``Σ_i ∫|ŷ_i − y_i| dt`` and max abs error;
* the same two relative L2 errors for the exact Taylor skip alone (``skip_only_*``).

Pooled metrics (``metrics``): interpolation values pooled (held-out relative L2 over all their
points; rollout relative L2 mean and max over those μ), extrapolation values likewise under
``extrapolation_*``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import iae, relative_l2
from .problems import reference_flow, reference_trajectory
from .rollout import rollout

__all__ = ["evaluation_mus", "evaluate_family", "plot_family"]


def evaluation_mus(mu_range, n_inside: int = 5, outside: float = 0.1) -> list[tuple[float, str]]:
    """``[(μ, "interpolation" | "extrapolation"), …]`` in increasing μ: ``n_inside`` midpoints of
    equal sub-intervals of ``[lo, hi]`` and ``lo − outside·w`` (when ≥ 0), ``hi + outside·w``
    (``w = hi − lo``)."""
    lo, hi = (float(v) for v in mu_range)
    if not 0 <= lo < hi:
        raise ValueError(f"mu_range must satisfy 0 <= LO < HI, got {lo:g} {hi:g}")
    w = hi - lo
    inside = [(round(lo + (k + 0.5) * w / n_inside, 12), "interpolation") for k in range(n_inside)]
    below = [(round(lo - outside * w, 12), "extrapolation")] if lo - outside * w >= 0 else []
    return below + inside + [(round(hi + outside * w, 12), "extrapolation")]


def evaluate_family(cfg, model) -> dict:
    """Per-μ errors of a family flow map against ``solve_ivp`` (see the module docstring).

    Returns ``{"metrics": pooled, "per_mu_metrics": [dict per μ], "per_mu": [arrays per μ]}``;
    each ``per_mu`` entry holds ``mu``, ``regime``, ``t`` ``(T,)``, ``roll``/``ref_roll``
    ``(T, 2)``, ``roll_skip`` (with a Taylor skip), ``pred``/``ref`` ``(n_test, 21, 2)``."""
    from .vdp import _predict, _SkipOnly, held_out_states

    model.eval()
    dts = np.linspace(0, cfg.horizon, 21)
    y0s = held_out_states(cfg)
    skip = _SkipOnly(model) if getattr(model, "order", 0) > 0 else None
    per_mu, table = [], []
    for mu, regime in evaluation_mus(cfg.mu_range):
        ref = reference_flow(y0s, dts, mu)  # (K, T, 2)
        x = np.concatenate([np.broadcast_to(dts[None, :, None], (len(y0s), len(dts), 1)),
                            np.broadcast_to(y0s[:, None, :], (len(y0s), len(dts), 2)),
                            np.full((len(y0s), len(dts), 1), mu)], 2).reshape(-1, 4)
        pred = _predict(model, x).reshape(ref.shape)
        t_roll, y_roll = rollout(model, cfg.y0, cfg.rollout_t_end, cond=(mu,))
        ref_roll = reference_trajectory(cfg.y0, t_roll, mu)
        row = {"mu": mu, "regime": regime,
               "held_out_rel_l2": relative_l2(pred, ref),
               "held_out_increment_rel_l2": relative_l2(pred - y0s[:, None], ref - y0s[:, None]),
               "rollout_rel_l2": relative_l2(y_roll, ref_roll),
               "rollout_iae": iae(y_roll, ref_roll, t_roll),
               "rollout_max_abs_error": float(np.abs(y_roll - ref_roll).max())}
        arrays = {"mu": mu, "regime": regime, "t": t_roll, "roll": y_roll, "ref_roll": ref_roll, "pred": pred, "ref": ref}
        if skip is not None:
            sk = _predict(skip, x).reshape(ref.shape)
            _, y_sk = rollout(skip, cfg.y0, cfg.rollout_t_end, cond=(mu,))
            row.update(skip_only_held_out_rel_l2=relative_l2(sk, ref), skip_only_rollout_rel_l2=relative_l2(y_sk, ref_roll),
                       held_out_remainder_rel_l2=relative_l2(pred - sk, ref - sk))
            arrays.update(roll_skip=y_sk, skip=sk)
        table.append(row)
        per_mu.append(arrays)
    metrics = {}
    for regime, prefix in (("interpolation", ""), ("extrapolation", "extrapolation_")):
        sel = [a for a in per_mu if a["regime"] == regime]
        rows = [r for r in table if r["regime"] == regime]
        if not sel:
            continue
        pred, ref = np.stack([a["pred"] for a in sel]), np.stack([a["ref"] for a in sel])
        metrics[prefix + "mus"] = [r["mu"] for r in rows]
        metrics[prefix + "held_out_rel_l2"] = relative_l2(pred, ref)
        metrics[prefix + "rollout_rel_l2_mean"] = float(np.mean([r["rollout_rel_l2"] for r in rows]))
        metrics[prefix + "rollout_rel_l2_max"] = float(np.max([r["rollout_rel_l2"] for r in rows]))
        if skip is not None:
            sk = np.stack([a["skip"] for a in sel])
            metrics[prefix + "skip_only_held_out_rel_l2"] = relative_l2(sk, ref)
            metrics[prefix + "held_out_remainder_rel_l2"] = relative_l2(pred - sk, ref - sk)
            metrics[prefix + "skip_only_rollout_rel_l2_mean"] = float(np.mean([r["skip_only_rollout_rel_l2"] for r in rows]))
    return {"metrics": metrics, "per_mu_metrics": table, "per_mu": per_mu, "dts": dts, "y0s": y0s}


def plot_family(cfg, ev: dict, history: list[dict], out: Path) -> dict[str, Path]:
    """``vdp_family_trajectories.png`` (per μ: y₁(t) and the phase portrait of the rollout vs
    ``solve_ivp``), ``vdp_family_errors.png`` (relative L2 vs μ) and ``vdp_loss.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import plot_losses

    out = Path(out)
    files = {"loss_plot": plot_losses(history, out / "vdp_loss.png")} if history else {}
    runs = ev["per_mu"]
    fig, axes = plt.subplots(2, len(runs), figsize=(2.6 * len(runs), 5.2), squeeze=False)
    for j, (a, row) in enumerate(zip(runs, ev["per_mu_metrics"])):
        top, bottom = axes[0, j], axes[1, j]
        top.plot(a["t"], a["ref_roll"][:, 0], "k-", lw=2.5, alpha=0.35, label="solve_ivp")
        top.plot(a["t"], a["roll"][:, 0], "C0--", lw=1.1, label=f"{cfg.model} rollout")
        if "roll_skip" in a:
            top.plot(a["t"], a["roll_skip"][:, 0], "C3:", lw=0.8, label="Taylor skip alone")
        extra = a["regime"] == "extrapolation"
        top.set_title(f"μ = {a['mu']:g}{' (extrapolation)' if extra else ''}\nrollout rel L2 {row['rollout_rel_l2']:.1e}",
                      fontsize=8, color="C3" if extra else "k")
        top.set_xlabel("t", fontsize=8)
        bottom.plot(a["ref_roll"][:, 0], a["ref_roll"][:, 1], "k-", lw=2.5, alpha=0.35)
        bottom.plot(a["roll"][:, 0], a["roll"][:, 1], "C0--", lw=1.1)
        bottom.set_xlabel("$y_1$", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("$y_1$", fontsize=8)
    axes[1, 0].set_ylabel("$y_2$", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    lo, hi = cfg.mu_range
    fig.suptitle(f"Van der Pol family, trained on μ ∈ [{lo:g}, {hi:g}]: rollouts (h = {cfg.horizon:g}) "
                 f"from y(0) = {tuple(cfg.y0)} vs solve_ivp", fontsize=9)
    fig.tight_layout()
    files["trajectory_plot"] = out / "vdp_family_trajectories.png"
    fig.savefig(files["trajectory_plot"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    mus = [r["mu"] for r in ev["per_mu_metrics"]]
    ax.axvspan(lo, hi, color="C2", alpha=0.1, label="training range")
    ax.semilogy(mus, [r["held_out_rel_l2"] for r in ev["per_mu_metrics"]], "C0o-", label="held-out flows, model")
    ax.semilogy(mus, [r["rollout_rel_l2"] for r in ev["per_mu_metrics"]], "C1s-", label="rollout to t = "
                f"{cfg.rollout_t_end:g}, model")
    if "skip_only_held_out_rel_l2" in ev["per_mu_metrics"][0]:
        ax.semilogy(mus, [r["skip_only_held_out_rel_l2"] for r in ev["per_mu_metrics"]], "C0:", lw=1,
                    label="held-out, Taylor skip alone")
        ax.semilogy(mus, [r["skip_only_rollout_rel_l2"] for r in ev["per_mu_metrics"]], "C1:", lw=1,
                    label="rollout, Taylor skip alone")
    ax.set_xlabel("μ")
    ax.set_ylabel("relative L2 vs solve_ivp")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    files["error_plot"] = out / "vdp_family_errors.png"
    fig.savefig(files["error_plot"], dpi=90)
    plt.close(fig)
    return files
