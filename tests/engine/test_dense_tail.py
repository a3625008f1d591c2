"""Derivative solves at one point share the dense LU of the rows Richardson leaves."""

from __future__ import annotations

import warnings

import torch

import deqdiff


def _problem(S: int = 12, n: int = 72, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))  # orthogonal: every |eigenvalue| is 1
    # rows wider than 64 take the iterative path; per-row contraction from 0.2 to 0.95: the
    # slow rows outlast Richardson's cap (72 iterations here)
    s = torch.linspace(0.2, 0.95, S)[:, None]
    x = (0.01 * torch.randn(S, n, generator=gen)).requires_grad_()
    f = lambda z, A, s, x: torch.tanh(s * (z @ A.T) + x)  # noqa: E731
    return f, A, s, x


def _adjoint_reference(f, z, A, s, x, us):
    """x̄ = (∂f/∂x)ᵀ (I − ∂f/∂z)⁻ᵀ u for each u of ``us``, row by row in float64."""
    out = [[] for _ in us]
    for i in range(z.shape[0]):
        J, Jx = torch.func.jacrev(lambda zz, xx: f(zz, A, s[i], xx), argnums=(0, 1))(z[i], x[i].detach())
        M = (torch.eye(len(J)) - J).T
        for o, u in zip(out, us):
            o.append(Jx.T @ torch.linalg.solve(M, u[i]))
    return [torch.stack(o) for o in out]


def test_second_solve_reuses_the_factored_rows_and_both_are_exact(monkeypatch):
    f, A, s, x = _problem()
    z, info = deqdiff.fixed_point(f, torch.zeros_like(x), A, s, x, tol=1e-10, max_iter=2000, return_info=True)
    factorizations = []
    real = torch.linalg.lu_factor_ex
    monkeypatch.setattr(torch.linalg, "lu_factor_ex", lambda M, **kw: factorizations.append(M.shape[0]) or real(M, **kw))
    g1, = torch.autograd.grad(z[:, 0].sum(), x, retain_graph=True)
    first = list(factorizations)
    g2, = torch.autograd.grad(z[:, 1].sum(), x)
    assert first and sum(first) < x.shape[0], "the slow rows only are factored"
    assert factorizations == first, "the second solve at the same point factors nothing new"
    solves = [d for d in info.derivatives]
    assert len(solves) == 2 and all(d.all_converged for d in solves)
    assert solves[0].extra["finished_rows"] == first[0]
    # the factored rows (the slowest: largest contraction, last) start the second solve at
    # their LU solution and stop at iteration 0
    assert (solves[1].iterations[-first[0]:] == 0).all() and (solves[1].iterations[:-first[0]] > 0).all()
    zd = z.detach()
    us = [torch.zeros_like(zd).index_fill_(1, torch.tensor([k]), 1.0) for k in (0, 1)]
    for g, ref in zip((g1, g2), _adjoint_reference(f, zd, A, s, x, us)):
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10)


def test_auto_linear_solve_recovers_where_richardson_diverges():
    # A = I − J with ρ(J) = 3: Richardson diverges; without a forward solve to size its budget,
    # "auto" hands over to GMRES after a bounded number of steps instead of returning inf
    n = 80  # wider than the dense default's 64 unknowns
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    J = Q @ torch.diag(torch.linspace(-0.5, 3.0, n)) @ Q.T
    b = torch.randn(2, n, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = deqdiff.linear_solve(lambda v, J: v - v @ J.T, b, J, tol=1e-10)
    ref = torch.linalg.solve(torch.eye(n) - J, b.T).T
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-9)
