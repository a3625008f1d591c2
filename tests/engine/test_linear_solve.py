"""``linear_solve``: solution and derivatives of every order against dense float64 algebra."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd, jacrev, vmap

import deqdiff
from tests.conftest import rel_err


def matvec(v, M, d):
    """A(M, d) v = (I·diag(d) − M) v: a parametrised nonsymmetric operator."""
    return d * v - v @ M.T


@pytest.fixture
def system(gen):
    n = 6
    M = (0.3 * torch.randn(n, n, generator=gen) / n**0.5).requires_grad_()
    d = (1.5 + torch.rand(n, generator=gen)).requires_grad_()
    b = torch.randn(n, generator=gen).requires_grad_()
    return M, d, b


def dense(M, d, b):
    return torch.linalg.solve(torch.diag(d) - M, b)


@pytest.mark.parametrize("solver", ["dense", "gmres", "bicgstab"])
def test_solution_and_three_orders(system, solver):
    M, d, b = system

    def derivs(fn):
        x = fn(M, d, b)
        g = torch.autograd.grad((x**3).sum(), (M, d, b), create_graph=True)
        s = sum((gi**2).sum() for gi in g)
        h = torch.autograd.grad(s, (M, d, b), create_graph=True)
        k = torch.autograd.grad(sum(hi.sum() for hi in h), (M, d, b))
        return (x,), g, h, k

    ours = derivs(lambda M, d, b: deqdiff.linear_solve(matvec, b, M, d, solver=solver, tol=1e-13))
    ref = derivs(dense)
    for a, r in zip(ours, ref):
        for ai, ri in zip(a, r):
            assert rel_err(ai, ri) < 1e-8


def test_gradcheck_gradgradcheck(system):
    M, d, b = system
    fn = lambda M, d, b: deqdiff.linear_solve(matvec, b, M, d, tol=1e-13)
    assert torch.autograd.gradcheck(fn, (M, d, b))
    assert torch.autograd.gradgradcheck(fn, (M, d, b))


def test_func_transforms(system):
    M, d, b = (t.detach() for t in system)
    fn = lambda b, M: deqdiff.linear_solve(matvec, b, M, d, tol=1e-13)
    ref = lambda b, M: dense(M, d, b)
    assert rel_err(jacfwd(fn, argnums=1)(b, M), jacfwd(ref, argnums=1)(b, M)) < 1e-9
    assert rel_err(jacrev(fn, argnums=1)(b, M), jacrev(ref, argnums=1)(b, M)) < 1e-9
    B = torch.stack([b, -2 * b, 0.5 * b])
    assert rel_err(vmap(fn, in_dims=(0, None))(B, M), vmap(ref, in_dims=(0, None))(B, M)) < 1e-10


def test_batched_systems_and_info(gen):
    S, n = 5, 4
    Ms = 0.3 * torch.randn(S, n, n, generator=gen) / n**0.5
    b = torch.randn(S, n, generator=gen)
    mv = lambda v, Ms: v - torch.einsum("sij,sj->si", Ms, v)
    x, infos = deqdiff.linear_solve(mv, b, Ms, batch_ndim=1, solver="gmres", tol=1e-12, return_info=True)
    ref = torch.linalg.solve(torch.eye(n) - Ms, b)
    assert rel_err(x, ref) < 1e-10
    assert infos[0].converged.shape == (S,) and infos[0].all_converged


def test_auto_escalates_to_dense_where_richardson_diverges_and_gmres_stalls():
    # I − J with J = 1.5·Q (Q orthogonal): Richardson diverges and restarted GMRES stalls
    # (the spectrum surrounds 0); a dense LU solves it at once
    import time

    n = 100
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(n, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z0 = torch.linalg.solve(torch.eye(n) - 1.5 * Q, x.detach())  # the fixed point itself
    z, info = deqdiff.fixed_point(lambda z, x: 1.5 * (z @ Q.T) + x, z0, x, return_info=True, on_fail="raise")
    start = time.perf_counter()
    (g,) = torch.autograd.grad(z.sum(), x)
    elapsed = time.perf_counter() - start
    ref = torch.linalg.solve((torch.eye(n) - 1.5 * Q).T, torch.ones(n))
    assert float((g - ref).norm() / ref.norm()) < 1e-6
    assert info.derivatives[0].extra["gmres_finished_by"] == "dense"
    assert elapsed < 20  # before the escalation GMRES ran its whole budget and ended unconverged
