"""Item 4: the loss Hessian split into Term A (Gauss–Newton) and Term B (dynamics), seed 000,
against torch.func.hessian through unrolled autodiff, the seed's block formula with explicit
matrices, and finite differences of the engine's gradient."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp

import deqdiff
from deqdiff.derivatives import LossHessian
from tests.conftest import make_problem, rel_err, tanh_cell, unrolled
from tests.derivatives.helpers import TIGHT, SolveCounter, solve
from tests.derivatives.test_jacobian import Cell

BATCH = 3


@pytest.fixture
def problem(gen):
    z0, p = make_problem(gen, batch=BATCH)
    A, B, x, b = (q.detach() for q in p)
    W = torch.randn(2, 5, generator=gen)
    y = torch.randn(BATCH, 2, generator=gen)
    z = solve(tanh_cell, z0, (A, B, x, b), batch_ndim=1)
    return z0, z, (A, B, x, b), W, y


def nonconvex_loss(W, y):
    return lambda z: ((z @ W.T - y) ** 2).sum() + (z**3).sum()


def convex_loss(W, y):
    return lambda z: 0.5 * ((z @ W.T - y) ** 2).sum() + torch.nn.functional.softplus(z).sum()


def flat_theta(A, B, b):
    return torch.cat([A.reshape(-1), B.reshape(-1), b])


def split_theta(th):
    return th[:25].reshape(5, 5), th[25:40].reshape(5, 3), th[40:]


def unrolled_hessian(z0, params, loss):
    A, B, x, b = params

    def L(th):
        A_, B_, b_ = split_theta(th)
        return loss(unrolled(tanh_cell, z0, A_, B_, x, b_))

    return hessian(L)(flat_theta(A, B, b))


def block_formula(z0, z, params, loss):
    """Seed 000 with explicit matrices: Z from unrolled autodiff, J = ∂f/∂h dense, λ by
    torch.linalg.solve, ∇²S by torch.func.hessian of S(θ, h) = λᵀ f(h, θ)."""
    A, B, x, b = params
    th = flat_theta(A, B, b)
    P, M = th.numel(), z.numel()
    Z = jacrev(lambda th: unrolled(tanh_cell, z0, *split_theta(th)[:2], x, split_theta(th)[2]))(th).reshape(M, P)
    HL = hessian(loss)(z).reshape(M, M)
    J = jacrev(lambda h: tanh_cell(h, A, B, x, b))(z).reshape(M, M)
    gL = grad(loss)(z).reshape(M)
    lam = torch.linalg.solve((torch.eye(M) - J).T, gL)

    def S(v):
        A_, B_, b_ = split_theta(v[:P])
        return lam @ tanh_cell(v[P:].reshape(z.shape), A_, B_, x, b_).reshape(M)

    HS = hessian(S)(torch.cat([th, z.reshape(-1)]))
    IZ = torch.cat([torch.eye(P), Z])
    return Z.T @ HL @ Z, IZ.T @ HS @ IZ


@pytest.fixture(scope="module")
def references():
    """The unrolled Hessian and the block-formula terms of the nonconvex loss (computed once)."""
    return {}


def _refs(cache, problem):
    if not cache:
        z0, z, params, W, y = problem
        loss = nonconvex_loss(W, y)
        cache["A"], cache["B"] = block_formula(z0, z, params, loss)
        cache["total"] = unrolled_hessian(z0, params, loss)
    return cache["A"], cache["B"], cache["total"]


def test_terms_match_block_formula_and_unrolled_hessian(problem, references, monkeypatch):
    z0, z, params, W, y = problem
    loss = nonconvex_loss(W, y)
    count = SolveCounter(monkeypatch)
    H = LossHessian(tanh_cell, z, params, loss, argnums=(0, 1, 3), batch_ndim=1)
    assert count.calls == 1  # λ
    A_, B_, T_ = H.dense("gauss_newton"), H.dense("dynamics"), H.dense("total")
    assert count.calls == 1 + 3 * 2  # each dense term: 2 batched solves
    ref_A, ref_B, ref = _refs(references, problem)
    assert rel_err(A_, ref_A) < 1e-10
    assert rel_err(B_, ref_B) < 1e-10
    assert rel_err(T_, ref) < 1e-10
    assert rel_err(A_ + B_, ref) < 1e-8  # Term A + Term B = full Hessian
    assert rel_err(T_, T_.T) < 1e-12


def test_products_cost_two_solves_and_match_dense(problem, references, monkeypatch):
    z0, z, params, W, y = problem
    H = LossHessian(tanh_cell, z, params, nonconvex_loss(W, y), argnums=(0, 1, 3), batch_ndim=1)
    ref_A, ref_B, ref = _refs(references, problem)
    gen = torch.Generator().manual_seed(7)
    v = tuple(torch.randn(p.shape, generator=gen) for p in (params[0], params[1], params[3]))
    vf = H.flatten(v)
    count = SolveCounter(monkeypatch)
    for method, R in [(H.hvp, ref), (H.gauss_newton_vp, ref_A), (H.dynamics_vp, ref_B)]:
        before = count.calls
        out = method(v)
        assert count.calls - before == 2
        assert isinstance(out, tuple) and [o.shape for o in out] == [t.shape for t in v]
        assert rel_err(H.flatten(out), R @ vf) < 1e-10
    Zv = H.jacobian_vp(v)
    ZtZv = H.jacobian_tvp(Zv)
    assert count.calls == 3 * 2 + 2
    Z = jacrev(lambda A, B, b: unrolled(tanh_cell, z0, A, B, params[2], b), argnums=(0, 1, 2))(
        params[0], params[1], params[3])
    Zm = torch.cat([j.reshape(z.numel(), -1) for j in Z], 1)
    assert rel_err(Zv.reshape(-1), Zm @ vf) < 1e-11
    assert rel_err(H.flatten(ZtZv), Zm.T @ (Zm @ vf)) < 1e-11


def test_hvp_matches_finite_differences_of_engine_gradient(problem):
    z0, z, params, W, y = problem
    A, B, x, b = params
    loss = nonconvex_loss(W, y)
    H = LossHessian(tanh_cell, z, params, loss, argnums=0, batch_ndim=1)
    V = torch.randn(A.shape, generator=torch.Generator().manual_seed(3))

    def g(A_):
        A_ = A_.clone().requires_grad_()
        zz = deqdiff.fixed_point(tanh_cell, z0, A_, B, x, b, batch_ndim=1, **TIGHT)
        return torch.autograd.grad(loss(zz), A_)[0]

    eps = 1e-5
    fd = (g(A + eps * V) - g(A - eps * V)) / (2 * eps)
    assert rel_err(H.hvp(V), fd) < 1e-7


def test_gauss_newton_term_is_psd_for_convex_loss(problem):
    z0, z, params, W, y = problem
    H = LossHessian(tanh_cell, z, params, convex_loss(W, y), argnums=(0, 1, 3), batch_ndim=1)
    GN = H.dense("gauss_newton")
    ev = torch.linalg.eigvalsh(0.5 * (GN + GN.T))
    assert ev.min() >= -1e-12 * ev.max()
    assert ev.max() > 0
    total = torch.linalg.eigvalsh(H.dense("total"))
    assert total.min() < -1e-6  # the dynamics term makes the total indefinite here


def test_dynamics_term_vanishes_at_zero_loss_gradient(problem):
    z0, z, params, W, y = problem
    target = z.detach().clone()
    loss = lambda h: 0.5 * ((h - target) ** 2).sum()  # ∇_h L(h*) = 0
    H = LossHessian(tanh_cell, z, params, loss, argnums=(0, 1, 3), batch_ndim=1)
    assert H.lam.abs().max() < 1e-12
    B_, T_ = H.dense("dynamics"), H.dense("total")
    assert B_.abs().max() < 1e-12 * T_.abs().max()
    assert rel_err(T_, H.dense("gauss_newton")) < 1e-12
    assert rel_err(T_, unrolled_hessian(z0, params, loss)) < 1e-9


def test_module_parameter_dict_and_iterative_solver(gen):
    torch.manual_seed(1)
    cell = Cell(5, 3)
    params = {k: v.detach() for k, v in cell.named_parameters()}
    x = torch.randn(4, 3, generator=gen)
    z0 = torch.zeros(4, 5)
    f = lambda z, p, x: functional_call(cell, p, (z, x))
    loss = lambda z: (torch.sin(z) ** 2).sum() + z.sum()
    z = unrolled(f, z0, params, x).detach()
    V = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    ref = jvp(grad(lambda p: loss(unrolled(f, z0, p, x))), (params,), (V,))[1]
    for opts in (dict(batch_ndim=1), dict(batch_ndim=1, solver="gmres", tol=1e-12)):
        H = LossHessian(f, z, (params, x), loss, 0, **opts)
        out = H.hvp(V)
        assert set(out) == set(params)
        for k in params:
            assert rel_err(out[k], ref[k]) < 1e-9
        gn, dyn = H.gauss_newton_vp(V), H.dynamics_vp(V)
        for k in params:
            assert rel_err(gn[k] + dyn[k], ref[k]) < 1e-9
    assert H.dim == sum(v.numel() for v in params.values())
