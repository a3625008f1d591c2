"""Forward solvers: accuracy, batch independence, frozen rows, statistics, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqdiff.solvers import get_solver
from deqdiff.solvers.base import row_norm
from solver_problems import FORWARD, affine_problem, gen, make_map, with_norm

MAX_ITER = {"fixed_point": 2000, "anderson": 500, "broyden": 500, "newton_krylov": 50}


def solve(name, g, z0, **kw):
    kw.setdefault("max_iter", MAX_ITER[name])
    return get_solver(name)(g, z0, **kw)


def test_registered(forward_name):
    assert callable(get_solver(forward_name, "forward"))


def test_affine_fixed_point(forward_name):
    g, z_star, _, _ = affine_problem(4, 16, 0.5, seed=1)
    z, info = solve(forward_name, g, torch.zeros_like(z_star), tol=1e-12)
    assert info.all_converged, info.summary()
    assert info.solver == forward_name and info.kind == "forward"
    torch.testing.assert_close(z, z_star, atol=1e-10, rtol=0)


def test_tanh_fixed_point(forward_name):
    """g(z) = tanh(z Aᵀ + x) with ‖A‖ = 0.5 (shared A, per-row x)."""
    g_ = gen(2)
    A = torch.randn(16, 16, generator=g_, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    x = torch.randn(5, 16, generator=g_, dtype=torch.float64)
    g = lambda z: torch.tanh(z @ A.T + x)  # noqa: E731
    reference = torch.zeros_like(x)
    for _ in range(200):  # contraction 0.5: 200 Picard steps are exact to rounding
        reference = g(reference)
    z, info = solve(forward_name, g, torch.zeros_like(x), tol=1e-12)
    assert info.all_converged, info.summary()
    torch.testing.assert_close(z, reference, atol=1e-10, rtol=0)
    # ‖z − z*‖ ≤ ‖g(z) − z‖/(1 − 0.5): the reported residual bounds the error
    assert float((row_norm(g(z) - z) - info.residual).abs().max()) < 1e-14


def test_reported_residual_is_that_of_returned_iterate(forward_name):
    g, z_star, _, _ = affine_problem(3, 10, [0.3, 0.6, 0.9], seed=3)
    for max_iter in (0, 2, 200):
        z, info = solve(forward_name, g, torch.zeros_like(z_star), tol=1e-10, max_iter=max_iter)
        gz = g(z)
        torch.testing.assert_close(info.residual, row_norm(gz - z), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(info.rel_residual, row_norm(gz - z) / row_norm(gz), rtol=1e-12, atol=1e-14)
        assert bool((info.converged == (info.residual <= 1e-10 * row_norm(gz))).all())


def test_not_converged_is_reported(forward_name):
    g, z_star, _, _ = affine_problem(3, 10, 0.9, seed=4)
    z, info = solve(forward_name, g, torch.zeros_like(z_star), tol=1e-14, max_iter=1)
    assert not info.converged.any()
    assert info.iterations.tolist() == [1, 1, 1]
    assert bool((info.residual > 1e-14 * row_norm(g(z))).all())
    assert "did not converge" not in info.summary()  # summary is a statistic, not an error
    assert "0/3 rows converged" in info.summary()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), S=st.integers(2, 5), N=st.integers(2, 12), name=st.sampled_from(FORWARD))
def test_batch_equals_rows_alone(seed, S, N, name):
    """Rows of very different difficulty: the batch answer equals each row alone, and
    converged rows are frozen (so the per-row iteration counts equal the lone ones)."""
    g_ = gen(seed)
    norms = torch.rand(S, generator=g_, dtype=torch.float64) * 0.85 + 0.05
    A = with_norm(S, N, norms, g_)
    c = torch.randn(S, N, generator=g_, dtype=torch.float64)
    z0 = torch.randn(S, N, generator=g_, dtype=torch.float64)
    for kind in ("affine", "tanh"):
        z, info = solve(name, make_map(kind, A, c), z0, tol=1e-11)
        assert info.all_converged, info.summary()
        for i in range(S):
            zi, info_i = solve(name, make_map(kind, A[i : i + 1], c[i : i + 1]), z0[i : i + 1], tol=1e-11)
            torch.testing.assert_close(z[i : i + 1], zi, atol=1e-10, rtol=0)
            assert int(info.iterations[i]) == int(info_i.iterations[0])


def test_converged_rows_frozen(forward_name):
    norms = [0.02, 0.9, 0.3, 0.7]
    g, z_star, _, _ = affine_problem(4, 24, norms, seed=5)
    z, info = solve(forward_name, g, torch.zeros_like(z_star), tol=1e-10, store_trajectory=True)
    its = info.iterations.tolist()
    assert info.all_converged and len(set(its)) > 1, its
    assert its[0] < its[1], its  # the nearly constant map needs fewer iterations
    K = info.max_iterations + 1
    assert info.abs_trace.shape == info.rel_trace.shape == (K, 4)
    for s, k in enumerate(its):  # after its own stop a row's trace and iterate stay put
        assert bool((info.abs_trace[k:, s] == info.abs_trace[k, s]).all())
        for zk in info.trajectory[k:]:
            assert torch.equal(zk[s], z[s])


def test_trajectory(forward_name):
    g, z_star, _, _ = affine_problem(2, 8, 0.5, seed=6)
    z0 = torch.zeros_like(z_star)
    z, info = solve(forward_name, g, z0, tol=1e-8, store_trajectory=True)
    assert len(info.trajectory) == info.max_iterations + 1
    assert info.abs_trace.shape == (info.max_iterations + 1, 2)
    assert all(t.shape == z0.shape for t in info.trajectory)
    assert torch.equal(info.trajectory[0], z0) and torch.equal(info.trajectory[-1], z)
    _, info = solve(forward_name, g, z0, tol=1e-8)
    assert info.trajectory is None


def test_scale_option(forward_name):
    """A fixed ``scale`` replaces ‖g(z)‖ in the stopping rule."""
    g, z_star, _, _ = affine_problem(2, 8, 0.5, seed=7)
    scale = torch.tensor([1.0, 1e6], dtype=torch.float64)
    z, info = solve(forward_name, g, torch.zeros_like(z_star), tol=1e-9, scale=scale)
    assert info.all_converged
    assert bool((info.residual <= 1e-9 * scale).all())
    assert info.iterations[1] <= info.iterations[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(forward_name, dtype):
    g64, z_star, A, c = affine_problem(3, 12, 0.5, seed=8)
    A, c = A.to(dtype), c.to(dtype)
    g = lambda z: torch.tanh(torch.bmm(A, z.unsqueeze(2)).squeeze(2) + c)  # noqa: E731
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    z, info = solve(forward_name, g, torch.zeros(3, 12, dtype=dtype), tol=tol)
    assert z.dtype == dtype and info.residual.dtype == dtype
    assert info.all_converged, info.summary()
    assert float(row_norm(g(z) - z).max()) <= 2 * tol * float(row_norm(g(z)).max())


def test_converged_start_takes_no_step(forward_name):
    g, z_star, _, _ = affine_problem(2, 6, 0.5, seed=9)
    z, info = solve(forward_name, g, z_star.clone(), tol=1e-8)
    assert info.iterations.tolist() == [0, 0] and torch.equal(z, z_star)
