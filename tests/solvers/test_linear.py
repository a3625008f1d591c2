"""Linear solvers: accuracy, batch independence, zero right-hand sides, honest failure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqdiff.solvers import get_solver
from deqdiff.solvers.base import row_norm
from solver_problems import LINEAR, DenseOp, gen, orthogonal, with_norm

CONTRACTIVE_ONLY = {"richardson", "anderson"}  # need ‖I − A‖ < 1 (ω = 1)
MAX_ITER = {"richardson": 500, "anderson": 300, "gmres": 300, "bicgstab": 300, "dense": 1}


def system(name: str, S: int, N: int, seed: int):
    """Well-conditioned nonsymmetric A (S, N, N) and b (S, N). For Richardson/Anderson
    A = I − M with ‖M‖ = 0.5; otherwise A = Q Σ Pᵀ with σ ∈ [0.5, 2] (generally
    indefinite, not of the form I − contraction)."""
    g = gen(seed)
    I = torch.eye(N, dtype=torch.float64)
    if name in CONTRACTIVE_ONLY:
        A = I - with_norm(S, N, 0.5, g)
    else:
        sig = 0.5 + 1.5 * torch.rand(S, N, generator=g, dtype=torch.float64)
        A = orthogonal(S, N, g) @ torch.diag_embed(sig) @ orthogonal(S, N, g).transpose(1, 2)
    return A, torch.randn(S, N, generator=g, dtype=torch.float64)


def lsolve(name, op, b, x0=None, **kw):
    kw.setdefault("max_iter", MAX_ITER[name])
    return get_solver(name, "linear")(op, b, x0, **kw)


def true_residual(op: DenseOp, b, x):
    return row_norm(b - op.mv(x))


def test_solves_to_tight_tolerance(linear_name):
    A, b = system(linear_name, 4, 12, seed=0)
    op = DenseOp(A)
    x, info = lsolve(linear_name, op, b, tol=1e-12)
    assert info.all_converged, info.summary()
    assert info.solver == linear_name and info.kind == "linear"
    assert bool((true_residual(op, b, x) <= 1.01e-12 * row_norm(b)).all())
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-10, rtol=0)
    torch.testing.assert_close(info.residual, true_residual(op, b, x), atol=1e-14, rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), S=st.integers(2, 5), N=st.integers(1, 14), name=st.sampled_from(LINEAR))
def test_batch_equals_rows_alone(seed, S, N, name):
    A, b = system(name, S, N, seed)
    scales = torch.logspace(-3, 3, S, dtype=torch.float64)  # rows of very different size
    b = b * scales[:, None]
    A[0] = torch.eye(N, dtype=torch.float64)  # an easy row among hard ones
    op = DenseOp(A)
    x, info = lsolve(name, op, b, tol=1e-12)
    assert info.all_converged, info.summary()
    for i in range(S):
        xi, info_i = lsolve(name, op.row(i), b[i : i + 1], tol=1e-12)
        torch.testing.assert_close(x[i : i + 1], xi, atol=1e-10 * float(scales[i]), rtol=0)
        assert int(info.iterations[i]) == int(info_i.iterations[0])


def test_zero_rows_return_zero(linear_name):
    A, b = system(linear_name, 3, 8, seed=1)
    b[1] = 0.0
    x0 = torch.randn(3, 8, generator=gen(2), dtype=torch.float64)
    x, info = lsolve(linear_name, DenseOp(A), b, x0, tol=1e-12)
    assert torch.equal(x[1], torch.zeros(8, dtype=torch.float64))
    assert bool(info.converged[1]) and float(info.residual[1]) == 0.0
    if linear_name != "dense":
        assert int(info.iterations[1]) == 0
    x, info = lsolve(linear_name, DenseOp(A), torch.zeros_like(b), tol=1e-12)
    assert torch.equal(x, torch.zeros_like(b)) and info.all_converged


def test_failure_is_reported(linear_name):
    if linear_name == "dense":
        A = torch.zeros(2, 3, 3, dtype=torch.float64)  # singular: the residual says so
        A[0] = torch.eye(3, dtype=torch.float64)
        op = DenseOp(A)
        op.dense_solve = lambda b: torch.linalg.lstsq(A, b.unsqueeze(2)).solution.squeeze(2)
        b = torch.ones(2, 3, dtype=torch.float64)
        x, info = lsolve("dense", op, b, tol=1e-12)
        assert info.converged.tolist() == [True, False]
        assert float(info.residual[1]) == pytest.approx(3**0.5)
        return
    A, b = system(linear_name, 3, 16, seed=3)
    op = DenseOp(A)
    x, info = lsolve(linear_name, op, b, tol=1e-15, max_iter=2)
    assert not info.converged.any(), info.summary()
    assert info.iterations.tolist() == [2, 2, 2]
    torch.testing.assert_close(info.residual, true_residual(op, b, x), rtol=1e-8, atol=0)
    torch.testing.assert_close(info.rel_residual, true_residual(op, b, x) / row_norm(b), rtol=1e-8, atol=0)


def test_initial_guess_used(linear_name):
    A, b = system(linear_name, 2, 8, seed=4)
    x_star = torch.linalg.solve(A, b)
    x, info = lsolve(linear_name, DenseOp(A), b, x_star.clone(), tol=1e-8)
    assert info.all_converged
    if linear_name != "dense":
        assert info.iterations.tolist() == [0, 0] and torch.equal(x, x_star)


@pytest.mark.parametrize("name", ["richardson", "anderson"])
def test_start_rescaled_per_row_when_only_the_right_hand_side_scale_changed(name):
    """A start that solved the system for b, given for s·b (a per-row scale of either sign, as
    the right-hand sides of warm-started derivative solves carry per-sample loss residuals), is
    scaled by s: the solve stops at iteration 0 where a plain start would iterate."""
    A, b = system(name, 4, 8, seed=6)
    x_star = torch.linalg.solve(A, b)
    s = torch.tensor([[-2.0], [0.5], [3.0], [-0.1]], dtype=torch.float64)
    x, info = lsolve(name, DenseOp(A), s * b, x_star.clone(), tol=1e-8)
    assert info.all_converged and info.iterations.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(x, s * x_star, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["richardson", "anderson"])
def test_a_poor_start_is_never_worse_than_zero(name):
    """The first residual from any start is at most ‖b‖ (the zero start's) and at most the
    start's own residual."""
    A, b = system(name, 5, 8, seed=7)
    x0 = 10 * torch.randn(5, 8, generator=gen(8), dtype=torch.float64)
    _, info = lsolve(name, DenseOp(A), b, x0, tol=1e-8)
    first = info.abs_trace[0]
    assert bool((first <= row_norm(b) * (1 + 1e-12)).all())
    assert bool((first <= row_norm(b - DenseOp(A).mv(x0)) * (1 + 1e-12)).all())
    assert info.all_converged
    x, info = lsolve(name, DenseOp(A), b, torch.full_like(b, float("nan")), tol=1e-8)  # a useless start
    assert info.all_converged and bool(torch.isfinite(x).all())


def test_traces(linear_name):
    A, b = system(linear_name, 3, 10, seed=5)
    _, info = lsolve(linear_name, DenseOp(A), b, tol=1e-10)
    K = info.max_iterations + (0 if linear_name == "dense" else 1)
    assert info.abs_trace.shape == info.rel_trace.shape == (K, 3)
    torch.testing.assert_close(info.abs_trace[-1], info.residual, rtol=0, atol=0)


def test_richardson_relaxation_reports_linear_residual():
    A, b = system("richardson", 3, 10, seed=6)
    op = DenseOp(A)
    for omega in (0.5, 1.0):
        x, info = lsolve("richardson", op, b, tol=1e-10, atol=1e-30, omega=omega)
        assert info.all_converged and info.extra["omega"] == omega
        assert info.atol == 1e-30 and info.tol == 1e-10
        # g(x) − x = ω(b − A x) up to the rounding of forming x + ω(…) − x
        torch.testing.assert_close(info.residual, true_residual(op, b, x), rtol=1e-6, atol=1e-14)
        assert bool((info.residual <= 1e-10 * row_norm(b)).all())
    _, slow = lsolve("richardson", op, b, tol=1e-10, omega=0.5)
    _, fast = lsolve("richardson", op, b, tol=1e-10, omega=1.0)
    assert slow.max_iterations > fast.max_iterations


def test_absolute_tolerance(linear_name):
    A, b = system(linear_name, 2, 10, seed=7)
    op = DenseOp(A)
    x, info = lsolve(linear_name, op, b, tol=0.0, atol=1e-6)
    assert info.all_converged
    assert bool((true_residual(op, b, x) <= 1.01e-6).all())


def test_gmres_restart_and_breakdown():
    A, b = system("gmres", 3, 12, seed=8)
    op = DenseOp(A)
    x_full, full = lsolve("gmres", op, b, tol=1e-12, restart=50)  # capped at N = 12
    assert full.extra["restart"] == 12 and full.all_converged
    assert full.max_iterations <= 13  # GMRES is exact after N steps (up to rounding)
    # GMRES(m) may stagnate on indefinite A; with ‖I − A‖ < 1 every restart length converges
    A = torch.eye(12, dtype=torch.float64) - with_norm(3, 12, 0.9, gen(1))
    op = DenseOp(A)
    x_full, full = lsolve("gmres", op, b, tol=1e-12, restart=12)
    x_short, short = lsolve("gmres", op, b, tol=1e-12, restart=3)
    assert short.all_converged and short.max_iterations > full.max_iterations
    torch.testing.assert_close(x_short, x_full, atol=1e-10, rtol=0)
    # happy breakdown: A with two distinct eigenvalues ⇒ exact after 2 steps
    S, N = 2, 9
    P = orthogonal(S, N, gen(9))
    ev = torch.tensor([1.0, 3.0] * 4 + [1.0], dtype=torch.float64)
    A2 = P @ torch.diag(ev) @ P.transpose(1, 2)
    b2 = torch.randn(S, N, generator=gen(10), dtype=torch.float64)
    x2, info2 = lsolve("gmres", DenseOp(A2), b2, tol=1e-13)
    assert info2.all_converged and info2.iterations.tolist() == [2, 2]
    torch.testing.assert_close(x2, torch.linalg.solve(A2, b2), atol=1e-12, rtol=0)


def test_dense_uses_one_solve_and_one_matvec():
    A, b = system("dense", 3, 6, seed=11)
    op = DenseOp(A)
    x, info = lsolve("dense", op, b, None)
    assert op.mv_calls == 1 and info.iterations.tolist() == [1, 1, 1]
    assert info.abs_trace.shape == (1, 3)


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "richardson", "anderson"])
def test_float32(name):
    A, b = system(name, 3, 10, seed=12)
    A, b = A.float(), b.float()
    x, info = lsolve(name, DenseOp(A), b, tol=1e-5)
    assert x.dtype == torch.float32 and info.all_converged, info.summary()
    assert bool((row_norm(b - DenseOp(A).mv(x)) <= 2e-5 * row_norm(b)).all())
