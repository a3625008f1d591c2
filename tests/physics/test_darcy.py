"""Darcy-flow data: the finite-difference solver against a manufactured solution (second-order
convergence), against a loop-by-loop assembly, scaling and symmetry; the coefficient sampler; the cache."""

from __future__ import annotations

import numpy as np
import pytest

from deqdiff.physics.darcy import (DarcySettings, darcy_matrix, generate, load_or_generate, sample_coefficients,
                                   solve_darcy)


def manufactured(s: int):
    """a = 1 + x + y², u = sin(πx) sin(2πy) (zero on the boundary), f = −∇·(a∇u) in closed form."""
    x = np.linspace(0, 1, s)
    X, Y = np.meshgrid(x, x, indexing="ij")
    a = 1 + X + Y ** 2
    u = np.sin(np.pi * X) * np.sin(2 * np.pi * Y)
    ux = np.pi * np.cos(np.pi * X) * np.sin(2 * np.pi * Y)
    uy = 2 * np.pi * np.sin(np.pi * X) * np.cos(2 * np.pi * Y)
    f = -(1.0 * ux + 2 * Y * uy + a * (-np.pi ** 2 * u) + a * (-4 * np.pi ** 2 * u))
    return a, u, f


def test_manufactured_solution_converges_at_second_order():
    errors = []
    for s in (17, 33, 65):
        a, u, f = manufactured(s)
        errors.append(np.abs(solve_darcy(a, f) - u).max())
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 1e-3
    assert np.all(rates > 1.9) and np.all(rates < 2.1), rates


def test_constant_coefficient_matches_the_five_point_laplacian_and_scales():
    s = 9
    u1 = solve_darcy(np.ones((s, s)), 1.0)
    u4 = solve_darcy(4 * np.ones((s, s)), 1.0)
    np.testing.assert_allclose(u4, u1 / 4, rtol=1e-13, atol=1e-16)  # −∇·(ca∇u) = f ⇒ u/c
    h = 1 / (s - 1)
    inner = u1[1:-1, 1:-1]
    lap = (4 * inner - u1[2:, 1:-1] - u1[:-2, 1:-1] - u1[1:-1, 2:] - u1[1:-1, :-2]) / h ** 2
    np.testing.assert_allclose(lap, 1.0, rtol=1e-10)
    assert np.all(u1[0] == 0) and np.all(u1[:, -1] == 0) and np.all(inner > 0)


def test_matrix_matches_loop_assembly_and_is_spd():
    rng = np.random.default_rng(3)
    s = 6
    a = rng.uniform(1, 5, (s, s))
    A = darcy_matrix(a).toarray()
    m, h2 = s - 2, (1 / (s - 1)) ** 2
    harm = lambda p, q: 2 * p * q / (p + q)  # noqa: E731
    ref = np.zeros((m * m, m * m))
    for i in range(1, s - 1):
        for j in range(1, s - 1):
            r = (i - 1) * m + (j - 1)
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                c = harm(a[i, j], a[i + di, j + dj]) / h2
                ref[r, r] += c
                ni, nj = i + di, j + dj
                if 1 <= ni <= s - 2 and 1 <= nj <= s - 2:
                    ref[r, (ni - 1) * m + (nj - 1)] -= c
    np.testing.assert_allclose(A, ref, rtol=1e-14)
    np.testing.assert_allclose(A, A.T, rtol=0, atol=0)
    assert np.linalg.eigvalsh(A).min() > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="> 0"):
        solve_darcy(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="square"):
        solve_darcy(np.ones((5, 4)))
    with pytest.raises(ValueError, match="forcing"):
        solve_darcy(np.ones((5, 5)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="resolution"):
        DarcySettings(resolution=2).validate()


def test_coefficients_are_two_valued_deterministic_and_spatially_correlated():
    a = sample_coefficients(40, 29, np.random.default_rng(0))
    b = sample_coefficients(40, 29, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {3.0, 12.0}
    assert 0.3 < (a == 12).mean() < 0.7
    # a smooth field thresholded: neighbours agree far more often than independent coin flips
    agree = (a[:, 1:, :] == a[:, :-1, :]).mean()
    assert agree > 0.85


def test_generate_is_seeded_and_cache_round_trips(tmp_path):
    st = DarcySettings(n_samples=3, resolution=9, seed=5)
    d1 = generate(st)
    np.testing.assert_array_equal(d1.u[1], solve_darcy(d1.a[1], 1.0))
    path = tmp_path / "d.npz"
    d2 = load_or_generate(path, st)
    assert path.is_file()
    np.testing.assert_array_equal(d2.a, d1.a)
    d3 = load_or_generate(path, st)  # read back
    np.testing.assert_array_equal(d3.u, d1.u)
    other = load_or_generate(path, DarcySettings(n_samples=3, resolution=9, seed=6))  # settings differ: regenerated
    assert not np.array_equal(other.a, d1.a)
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a Darcy data file"):
        load_or_generate(path, st)
