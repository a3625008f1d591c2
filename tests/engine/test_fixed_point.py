"""Every order of reverse-mode differentiation of ``fixed_point`` against independent
references: dense (I − J)⁻¹ formulas, unrolled autodiff, gradcheck/gradgradcheck."""

from __future__ import annotations

import importlib

import pytest
import torch

import deqdiff
from deqdiff.engine.linear_solve import ITERATIVE_AUTO
from tests.conftest import make_problem, rel_err, tanh_cell, unrolled

TIGHT = dict(tol=1e-12, max_iter=500)


def deq(z0, *params, **kw):
    return deqdiff.fixed_point(tanh_cell, z0, *params, **{**TIGHT, **kw})


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "newton_krylov"])
def test_forward_solution_is_fixed_point(gen, solver):
    z0, p = make_problem(gen)
    z = deq(z0, *p, solver=solver)
    assert rel_err(tanh_cell(z, *p), z) < 1e-11
    assert rel_err(z, unrolled(tanh_cell, z0, *p)) < 1e-11


def test_jacobian_matches_dense_ift_formula(gen):
    z0, (A, B, x, b) = make_problem(gen)
    jac = torch.autograd.functional.jacobian(lambda x: deq(z0, A, B, x, b), x)
    with torch.no_grad():
        z = deq(z0, A, B, x, b)
        D = torch.diag(1 - z**2)
        ref = torch.linalg.solve(torch.eye(5) - D @ A, D @ B)  # (I − J)⁻¹ ∂f/∂x
    assert rel_err(jac, ref) < 1e-10


@pytest.mark.parametrize("backward_solver", ["dense", "gmres", "bicgstab", "richardson", "anderson"])
def test_orders_one_to_three_match_unrolled(gen, backward_solver):
    z0, p = make_problem(gen)
    w = torch.randn(5, generator=gen)

    def derivatives(fn):
        z = fn(z0, *p)
        L = (w * z).sum() + (z**3).sum()
        g = torch.autograd.grad(L, p, create_graph=True)
        s = sum((gi**2).sum() for gi in g)  # second order: gradient of ‖∇L‖²
        h = torch.autograd.grad(s, p, create_graph=True)
        t = sum((hi * hi.detach().sign()).sum() for hi in h)  # third order
        k = torch.autograd.grad(t, p)
        return g, h, k

    got = derivatives(lambda *a: deq(*a, backward_solver=backward_solver))
    ref = derivatives(lambda *a: unrolled(tanh_cell, *a))
    for order, (a, r) in enumerate(zip(got, ref), start=1):
        for ai, ri in zip(a, r):
            assert rel_err(ai, ri) < 1e-8, f"order {order}"


def test_gradcheck_and_gradgradcheck(gen):
    z0, p = make_problem(gen, n=4, m=2)
    assert torch.autograd.gradcheck(lambda *a: deq(z0, *a), p)
    assert torch.autograd.gradgradcheck(lambda *a: deq(z0, *a), p)


def test_mixed_pattern_dzdx_then_grad_wrt_A(gen):
    """PINN pattern: dz*/dx by reverse mode with create_graph, then a loss on it w.r.t. A."""
    z0, p = make_problem(gen, batch=6)
    A, B, x, b = p

    def pattern(fn):
        z = fn(z0, *p)
        (dzdx,) = torch.autograd.grad(z[:, 0].sum(), x, create_graph=True)
        return torch.autograd.grad((dzdx**2).sum(), (A, B, b))

    for a, r in zip(pattern(lambda *a: deq(*a, batch_ndim=1)), pattern(lambda *a: unrolled(tanh_cell, *a))):
        assert rel_err(a, r) < 1e-9


def test_backward_memory_does_not_record_forward_iterations(gen):
    z0, p = make_problem(gen, rho=0.95)
    z = deq(z0, *p, solver="fixed_point", tol=1e-10, max_iter=2000)
    # the graph of z* is one node fed directly by the parameters, whatever the iterations
    assert type(z.grad_fn).__name__ == "_FixedPointBackward"
    parents = [fn for fn, _ in z.grad_fn.next_functions]
    assert parents[0] is None  # z0 does not enter the graph
    assert [type(fn).__name__ for fn in parents[1:]] == ["AccumulateGrad"] * len(p)


def test_info_reports_forward_and_derivative_solves(gen):
    z0, p = make_problem(gen)
    z, info = deq(z0, *p, return_info=True, store_trajectory=True)
    assert info.forward.all_converged and info.forward.max_residual <= 1e-12 * 2
    assert len(info.forward.trajectory) == info.forward.max_iterations + 1
    assert info.forward.abs_trace.shape[0] == info.forward.max_iterations + 1
    (g,) = torch.autograd.grad(z.sum(), p[2], create_graph=True)
    torch.autograd.grad(g.sum(), p[0])
    kinds = [d.kind for d in info.derivatives]
    assert kinds[0] == "derivative (transposed)" and len(kinds) >= 3
    assert all(d.all_converged for d in info.derivatives)


def test_batch_equals_each_sample_alone(gen):
    z0, (A, B, x, b) = make_problem(gen, batch=7)
    zb = deq(z0, A, B, x, b, batch_ndim=1)
    (gb,) = torch.autograd.grad((zb**2).sum(), A)
    alone = [deq(z0[i], A, B, x[i], b) for i in range(7)]
    (ga,) = torch.autograd.grad(sum((z**2).sum() for z in alone), A)
    assert rel_err(zb, torch.stack(alone)) < 1e-11
    assert rel_err(gb, ga) < 1e-10


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("B", [64, 700])  # 700: the in-place history compaction runs in chunks
def test_row_compaction_changes_cost_not_answers(solver, B):
    """With ``row_params`` the solvers evaluate f on running rows only: same iterates per row,
    same statistics, fewer evaluations of f."""
    torch.manual_seed(3)
    n = 6
    A = torch.randn(n, n, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(B, n, dtype=torch.float64)
    c = torch.linspace(0.02, 0.9, B, dtype=torch.float64)  # per-row contraction: iterations spread
    rows_seen = []

    def f(z, A, x, c):
        rows_seen.append(z.shape[0])
        return torch.tanh(c[:, None] * (z @ A.T) + x)

    z0 = torch.zeros(B, n, dtype=torch.float64)
    opts = dict(solver=solver, tol=1e-10, batch_ndim=1, max_iter=300, return_info=True)
    z_full, info_full = deqdiff.fixed_point(f, z0, A, x, c, row_params=False, **opts)
    full_cost, rows_seen[:] = sum(rows_seen), []
    z_cmp, info_cmp = deqdiff.fixed_point(f, z0, A, x, c, row_params=(1, 2), **opts)
    assert sum(rows_seen) < 0.8 * full_cost
    torch.testing.assert_close(z_cmp, z_full, rtol=1e-12, atol=1e-14)
    assert torch.equal(info_cmp.forward.iterations, info_full.forward.iterations)
    assert info_cmp.forward.all_converged
    torch.testing.assert_close(info_cmp.forward.rel_trace, info_full.forward.rel_trace, rtol=1e-6, atol=1e-14)  # BLAS roundoff differs by batch size


def test_row_params_are_validated():
    A, x = torch.eye(3) * 0.5, torch.randn(4, 3)
    f = lambda z, A, x: torch.tanh(z @ A.T + x)  # noqa: E731
    with pytest.raises(ValueError, match="dim 0 must index the 4 rows"):
        deqdiff.fixed_point(f, torch.zeros(4, 3), A, x, batch_ndim=1, row_params=(0,))
    with pytest.raises(ValueError, match="batch_ndim=1"):
        deqdiff.fixed_point(f, torch.zeros(4, 3), A, x, batch_ndim=0, row_params=(1,))


def test_auto_backward_falls_back_to_gmres_where_richardson_diverges():
    """Width > 64 and ρ(∂f/∂z) > 1 at z* (Newton–Krylov still finds z*): "auto" starts with
    Richardson, which diverges, and must finish with GMRES — exact gradient, no warning."""
    torch.manual_seed(0)
    n, B = 80, 3
    eig = torch.linspace(-0.5, 1.6, n, dtype=torch.float64)
    eig = torch.where((eig - 1).abs() < 0.2, eig - 0.4, eig)  # keep I − A well conditioned
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    A = (Q * eig) @ Q.T
    c = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    f = lambda z, A, c: z @ A.T + c  # noqa: E731
    z, info = deqdiff.fixed_point(f, torch.zeros(B, n, dtype=torch.float64), A, c, solver="newton_krylov",
                                  tol=1e-10, batch_ndim=1, row_params=False, on_fail="raise", return_info=True)
    (g,) = torch.autograd.grad((z**2).sum(), c)
    M = torch.eye(n, dtype=torch.float64) - A
    ref = torch.linalg.solve(M.T, (2 * torch.linalg.solve(M, c.detach().T)).T.T).T
    assert rel_err(g, ref) < 1e-8
    (solve,) = info.derivatives
    assert solve.solver == ITERATIVE_AUTO and solve.extra["finished_by"] == "gmres"
    assert solve.all_converged and bool((solve.iterations > solve.extra["gmres_restart"]).all())


def test_auto_backward_gmres_fallback_on_restricted_rows():
    """Same divergent Richardson with ``row_params`` and rows too wide for a dense tail
    (N > 256): GMRES finishes only the failed rows (here all), on the operator restricted
    to them."""
    torch.manual_seed(0)
    n, B = 300, 3
    eig = torch.linspace(-0.5, 1.6, n, dtype=torch.float64)
    eig = torch.where((eig - 1).abs() < 0.2, eig - 0.4, eig)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    A = (Q * eig) @ Q.T
    c = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    f = lambda z, A, c: z @ A.T + c  # noqa: E731
    z, info = deqdiff.fixed_point(f, torch.zeros(B, n, dtype=torch.float64), A, c, solver="newton_krylov",
                                  tol=1e-10, batch_ndim=1, on_fail="raise", return_info=True, row_params=(1,))
    (g,) = torch.autograd.grad((z**2).sum(), c)
    M = torch.eye(n, dtype=torch.float64) - A
    ref = torch.linalg.solve(M.T, (2 * torch.linalg.solve(M, c.detach().T)).T.T).T
    assert rel_err(g, ref) < 1e-8
    assert info.derivatives[0].extra["finished_by"] == "gmres"


def test_auto_backward_finishes_slow_tail_densely(monkeypatch):
    """With ``row_params`` "auto" runs Richardson for at most N iterations per row and
    hands rows still running to a dense LU on those rows only (in chunks): exact gradient,
    merged statistics, and a row's answer does not depend on its batch."""
    ls = importlib.import_module("deqdiff.engine.linear_solve")  # the module, not the function
    monkeypatch.setattr(ls, "TAIL_MIN_NUMBERS", 16 * 8 * 8)  # chunks of 16 rows here
    torch.manual_seed(4)
    n, B = 8, 300
    A = torch.randn(n, n, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    c = torch.linspace(0.05, 0.97, B, dtype=torch.float64)  # slow rows form a tail
    f = lambda z, A, x, c: torch.tanh(c[:, None] * (z @ A.T) + x)  # noqa: E731
    z0 = torch.zeros(B, n, dtype=torch.float64)
    opts = dict(solver="fixed_point", tol=1e-11, batch_ndim=1, on_fail="raise", return_info=True, max_iter=3000)
    z, info = deqdiff.fixed_point(f, z0, A, x, c, row_params=(1, 2), **opts)
    (g,) = torch.autograd.grad((z**3).sum(), x)
    z_ref = deqdiff.fixed_point(f, z0, A, x, c, backward_solver="dense", **opts)[0]
    (g_ref,) = torch.autograd.grad((z_ref**3).sum(), x)
    assert rel_err(g, g_ref) < 1e-9
    (solve,) = info.derivatives
    tail = solve.extra["finished_rows"]
    assert solve.extra["finished_by"] == "dense" and tail > 16  # more than one chunk
    assert solve.all_converged and solve.abs_trace.shape == (16 + 1 + 1, B)  # iterations 0..16, dense step
    assert int((solve.iterations == 17).sum()) == tail
    # rows alone (a batch of the last 5) get the same derivative: the cap is per row
    z5 = deqdiff.fixed_point(f, z0[-5:], A, x[-5:], c[-5:], row_params=(1, 2), **opts)[0]
    (g5,) = torch.autograd.grad((z5**3).sum(), x)
    torch.testing.assert_close(g5[-5:], g[-5:], rtol=1e-13, atol=1e-15)
