"""KdV: the spectral ETDRK4 reference against the exact soliton, grid/time-step refinement and
the conserved mass and energy; the interface problem's residual at the reference; the CLI job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deqdiff.cli import main
from deqdiff.physics.kdv import etdrk4_kdv, kdv, reference_on_grid, soliton


def test_soliton_travels_exactly():
    d2, c, N = 0.0025, 0.5, 256
    x = -1 + 2 * np.arange(N) / N
    _, u = etdrk4_kdv(soliton(x, 0.0, c, d2), d2, 0.2, dt=2e-4, n_out=2)
    # the soliton's tails at the periodic boundary are ~1e-5: the wrap-around is negligible
    assert np.abs(u[-1] - soliton(x, 0.2, c, d2)).max() < 1e-4


def test_refinement_and_invariants():
    x1, _, u1 = reference_on_grid(0.0025, 0.2, nx=128, nt=3, dt=4e-4)
    x2, _, u2 = reference_on_grid(0.0025, 0.2, nx=256, nt=3, dt=2e-4)
    assert np.abs(u1 - u2[:, ::2]).max() < 1e-6
    mass, energy = u2.sum(1), (u2 ** 2).sum(1)
    assert np.allclose(mass, mass[0], atol=1e-10) and np.allclose(energy, energy[0], rtol=1e-8)


def test_bad_reference_inputs():
    with pytest.raises(ValueError):
        etdrk4_kdv(np.zeros(4), 0.1, 1.0)
    with pytest.raises(ValueError):
        etdrk4_kdv(np.zeros(16), -0.1, 1.0)


def test_reference_satisfies_the_interface_residual():
    """u_t + u u_x + δ² u_xxx of the reference by spectral differentiation in x and central
    differences in t is small: the problem and the reference describe the same equation."""
    d2, T = 0.0025, 0.2
    x, t, u = reference_on_grid(d2, T, nx=128, nt=201, dt=2e-4)
    k = np.pi * np.fft.fftfreq(128, d=1 / 128)
    U = np.fft.fft(u, axis=1)
    ux = np.real(np.fft.ifft(1j * k * U, axis=1))
    uxxx = np.real(np.fft.ifft((1j * k) ** 3 * U, axis=1))
    ut = (u[2:] - u[:-2]) / (2 * (t[1] - t[0]))
    r = ut + u[1:-1] * ux[1:-1] + d2 * uxxx[1:-1]
    assert np.abs(r).max() < 1e-3 * np.abs(ut).max()


@pytest.mark.slow
def test_cli_smoke_and_interpolated_reference(tmp_path):
    x, _, u = reference_on_grid(0.0025, 0.2, nx=128, nt=201, dt=2e-4)
    X = np.stack([x[::8], np.full(16, 0.1)], 1)
    assert np.allclose(kdv(0.0025, 0.2).reference(X), u[100, ::8], atol=1e-6)
    out = tmp_path / "k"
    rc = main(["pinn", "kdv", "--epochs", "2", "--collocation", "16", "--boundary-points", "4", "--width", "5",
               "--models", "deq,mlp", "--out", str(out), "--no-progress", "--dtype", "float64"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"deq", "mlp"} and res["target_rel_l2"] == 5e-2
    assert (out / "kdv_deq.png").is_file() and (out / "kdv_loss.png").is_file()
