"""The physics figures are readable: labelled axes, the total loss drawn beneath the terms it may
equal, the optimizer switch marked, legends outside the data, colorbars labelled."""

from types import SimpleNamespace

import numpy as np
import pytest

from deqdiff.physics import plots


@pytest.fixture
def figs(monkeypatch):
    """Every figure the plotting code saves, kept open (nothing is written)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    got = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: got.append(self))
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield got
    monkeypatch.undo()
    for f in got:
        plt.close(f)


def _vdp_inputs(setup="conditioned"):
    t = np.linspace(0, 20, 101)
    ref = np.stack([2 * np.cos(t), 3 * np.sin(t)], 1)
    dts = np.linspace(0, 0.1, 6)
    y0s = np.random.default_rng(0).uniform(-3, 3, (10, 2))
    flows = y0s[:, None, :] + dts[None, :, None] * np.array([1.0, -1.0])
    ev = {"t": t, "roll": ref + 0.01, "ref_roll": ref, "roll_skip": 1.05 * ref, "pred": flows + 1e-3, "ref": flows,
          "metrics": {"rollout_rel_l2": 3.8e-3, "skip_only_rollout_rel_l2": 2.3e-2}}
    history = [{"step": i, "total": 1 / (i + 1) + 1e-3, "physics": 1 / (i + 1), "ic": 0.1 / (i + 1),
                "phase": "adam" if i < 30 else "lbfgs"} for i in range(40)]
    cfg = SimpleNamespace(setup=setup, horizon=0.1, taylor=2, mu=1.0)
    return cfg, ev, history


def test_vdp_loss_plot_shows_physics_above_total_and_marks_the_switch(figs, tmp_path):
    cfg, ev, history = _vdp_inputs()
    plots.plot_vdp(cfg, ev, history, tmp_path)
    loss_fig = figs[0]
    ax = loss_fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["physics"].get_zorder() > lines["total"].get_zorder()
    assert lines["physics"].get_linestyle() != lines["total"].get_linestyle() or \
        lines["physics"].get_linewidth() < lines["total"].get_linewidth()
    assert ax.get_title().strip() and ax.get_xlabel() and ax.get_ylabel()
    switch = [line for line in ax.get_lines() if line.get_label().startswith("_") and len(set(line.get_xdata())) == 1]
    assert len(switch) == 1 and switch[0].get_xdata()[0] == pytest.approx(29.5)
    assert any("Adam → L-BFGS" in t.get_text() for t in ax.texts)
    ticks = [x for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
    assert all(float(x).is_integer() for x in ticks)


def test_vdp_trajectory_and_phase_legends_do_not_cover_data(figs, tmp_path):
    cfg, ev, history = _vdp_inputs()
    files = plots.plot_vdp(cfg, ev, history, tmp_path)
    assert set(files) == {"loss_plot", "trajectory_plot", "phase_plot"}
    _, traj, phase = figs
    for fig in (traj, phase):
        assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    ax = phase.axes[0]
    refs = [line for line in ax.get_lines() if line.get_color() == "C3" and line.get_linestyle() == "-"]
    preds = [line for line in ax.get_lines() if line.get_color() == "C1"]
    assert len(refs) == len(preds) == 6  # a few flows, each reference beneath its prediction
    assert all(r.get_zorder() < p.get_zorder() and r.get_linewidth() > p.get_linewidth() for r, p in zip(refs, preds))
    assert ax.get_xlabel() == "$y_1$" and ax.get_ylabel() == "$y_2$"


def test_burgers_figures_label_colorbars_and_keep_total_beneath(figs, tmp_path):
    from deqdiff.physics.burgers import save_figures

    x, t = np.linspace(-1, 1, 9), np.linspace(0, 1, 5)
    u = np.sin(np.pi * x)[None] * np.exp(-t)[:, None]
    ev = {"pred": u + 1e-3, "ref": u, "rel_l2": 1e-3, "x": x, "t": t}
    hist = {"epoch": list(range(1, 6)), "loss": [1.0, 0.5, 0.3, 0.2, 0.1], "ic": [0.1] * 5, "bc": [0.01] * 5,
            "pde": [0.9, 0.45, 0.25, 0.18, 0.09]}
    cfg = SimpleNamespace(problem="burgers", nu=0.01 / np.pi, n_states=16, T=1.0)
    save_figures(ev, hist, cfg, tmp_path, "burgers")
    solution, slices, loss = figs
    cbars = [ax for ax in solution.axes if hasattr(ax, "_colorbar")]
    assert len(cbars) == 3 and all(ax.get_ylabel() for ax in cbars)
    assert len(slices.legends) == 1 and slices.axes[0].get_legend() is None
    lines = {line.get_label(): line for line in loss.axes[0].get_lines()}
    assert lines["pde"].get_zorder() > lines["total"].get_zorder()
    ticks = [x for x in loss.axes[0].get_xticks() if loss.axes[0].get_xlim()[0] <= x <= loss.axes[0].get_xlim()[1]]
    assert all(float(v).is_integer() for v in ticks)
