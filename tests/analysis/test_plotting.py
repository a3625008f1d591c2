"""The analysis figures are readable: every axis labelled, colorbars on colour maps, integer
epoch ticks, mathtext symbols, distinguishable lines, legends outside the data."""

import numpy as np
import pytest
import torch

from deqdiff.analysis import plotting
from deqdiff.analysis.landscape import Landscape
from deqdiff.analysis.residuals import ResidualCurves

EPOCHS = (0, 1, 2, 15)


@pytest.fixture
def figs(monkeypatch):
    """Every figure a plotting function saves, kept open for inspection (nothing is written)."""
    got = []

    def keep(fig, path):
        got.append(fig)
        return path

    monkeypatch.setattr(plotting, "_save", keep)
    yield got
    import matplotlib.pyplot as plt

    for f in got:
        plt.close(f)


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and not hasattr(ax, "_colorbar")]


def _labelled(fig):
    for ax in _data_axes(fig):
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), ax.get_title()


def _integer_xticks(ax):
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def _legend_texts(fig):
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def _colorbars(fig):
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


def test_residual_panels_name_sigma_and_share_one_outside_legend(figs):
    rel = 0.5 ** torch.arange(6.0)[:, None] * torch.rand(1, 5)
    c = ResidualCurves(rel, torch.full((5,), 6), torch.ones(5, dtype=torch.bool), "anderson")
    plotting.plot_residual_curves({"init N(0, σ²), σ = 0.1 (variance 0.01) / anderson": c, "trained / anderson": c},
                                  "unused.png", ncols=2)
    (fig,) = figs
    _labelled(fig)
    assert "σ = 0.1" in fig.axes[0].get_title()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1  # legend beside the panels
    _integer_xticks(fig.axes[0])


def test_trajectory_legend_outside_panels(figs):
    res = {f"epoch {e}": {"coords": torch.randn(5, 6, 2), "explained": torch.tensor([0.5, 0.2])} for e in (0, 1)}
    plotting.plot_trajectories(res, [0, 1, 2, 0, 1, 2], "unused.png")
    (fig,) = figs
    _labelled(fig)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1


def test_ntk_panels_labelled_integer_epochs_mathtext(figs):
    track = [{"epoch": e, "lambda_min": 0.5 / (e + 1), "lambda_max": 1e3 * (e + 1), "sigma_min_Z": 0.1} for e in EPOCHS]
    spectra = {f"epoch {e}": np.linspace(1e3, 1e-1, 40) for e in EPOCHS}
    plotting.plot_ntk(spectra, track, "unused.png")
    (fig,) = figs
    _labelled(fig)
    _integer_xticks(fig.axes[1])
    texts = _legend_texts(fig)
    assert r"$\lambda_{\min}(\Theta)$" in texts and r"$\lambda_{\max}(\Theta)$" in texts
    assert not any("λ_" in t for t in texts)  # no raw-text subscripts


def test_linear_rate_bounds_are_distinguishable(figs):
    k = np.arange(51)
    check = {"loss": 10 * 0.9 ** k, "bound_discrete": 10 * (1 - 1e-5) ** k, "bound_continuous": 10 * np.exp(-2e-5 * k),
             "lambda_0": 0.05, "lr": 0.03, "bound_holds": True, "theorem": {"all_hold": False},
             "sigma_min_Z": np.full(51, 0.05)}
    plotting.plot_linear_rate(check, "unused.png")
    (fig,) = figs
    _labelled(fig)
    for ax in fig.axes:
        _integer_xticks(ax)
    loss_ax, drop_ax = fig.axes[:2]
    _, disc, cont = loss_ax.get_lines()
    assert (disc.get_linestyle(), disc.get_color(), disc.get_marker()) != (
        cont.get_linestyle(), cont.get_color(), cont.get_marker())
    assert disc.get_linestyle() != cont.get_linestyle() and disc.get_marker() != cont.get_marker()
    # where the bounds overlap on the loss axis, their decreases 1 - B(k)/L(0) are a factor ~2 apart
    d, c = (np.asarray(line.get_ydata(), float) for line in drop_ax.get_lines()[1:])
    assert np.all(c[1:] / d[1:] > 1.9)


def test_hessian_panels_labelled_integer_epochs_mathtext(figs):
    track = [{"epoch": e, "total": [30.0 * (e + 1), 20.0, 10.0], "gauss_newton": [5.0, 4.0, 1.0],
              "dynamics": [25.0, 16.0, 9.0]} for e in EPOCHS]
    plotting.plot_hessian(track, "unused.png")
    (fig,) = figs
    _labelled(fig)
    for ax in _data_axes(fig):
        _integer_xticks(ax)
    assert {r"$\lambda_1$", r"$\lambda_2$", r"$\lambda_3$"} <= set(_legend_texts(fig))
    styles = [(line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()]
    assert len(set(styles)) == 3


def _lands(two_d=True):
    a = torch.linspace(-1, 1, 5, dtype=torch.float64)
    out = {}
    for s, name in ((1.0, "conv"), (2.0, "repeat-6")):
        if two_d:
            A, B = torch.meshgrid(a, a, indexing="ij")
            out[name] = Landscape(a, a, 0.5 + s * (A**2 + B**2), None, 0.5)
        else:
            out[name] = Landscape(a, None, 0.5 + s * a**2, 1 - 0.2 * s * a**2, 0.5)
    return out


def test_landscape_contours_have_axis_labels_and_a_colorbar(figs):
    plotting.plot_landscapes_2d(_lands(), "unused.png")
    (fig,) = figs
    _labelled(fig)
    assert "alpha" in fig.axes[0].get_xlabel() and "beta" in fig.axes[0].get_ylabel()
    (cb,) = _colorbars(fig)
    assert "loss" in cb.get_ylabel()


def test_landscape_surfaces_have_xyz_labels_and_a_colorbar(figs):
    plotting.plot_landscape_surfaces(_lands(), "unused.png")
    (fig,) = figs
    for ax in _data_axes(fig):
        assert "alpha" in ax.get_xlabel() and "beta" in ax.get_ylabel() and ax.get_zlabel()
    (cb,) = _colorbars(fig)
    assert "loss" in cb.get_ylabel()


def test_landscape_1d_lines_differ_in_style(figs):
    plotting.plot_landscapes_1d(_lands(two_d=False), "unused.png")
    (fig,) = figs
    _labelled(fig)
    a, b = fig.axes[0].get_lines()
    assert a.get_linestyle() != b.get_linestyle()
    assert len(fig.legends) == 1


def test_writes_a_png(tmp_path):
    path = plotting.plot_landscapes_1d(_lands(two_d=False), tmp_path / "sub" / "l.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
