"""Item 4: the loss Hessian split into Term A (Gauss–Newton) and Term B (dynamics), the Gauss–Newton + dynamics-curvature split,
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
    """The Hessian split with explicit matrices: Z from unrolled autodiff, J = ∂f/∂h dense, λ by
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


# --- a head on (z*, φ): a linear classifier whose weights are part of θ -----------------------

LABELS = torch.tensor([0, 2, 3])


def linear_head(z, C, c):
    return z @ C.T + c


def ce_loss(y):
    return torch.nn.functional.cross_entropy(y, LABELS, reduction="sum")


@pytest.fixture
def head_problem(problem, gen):
    z0, z, params, W, y = problem
    C, c = torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    return z0, z, params, C, c


def _split_head(th, A, b, C, c):
    """θ = (A, b, C, c) flattened, in LossHessian's order (params[argnums], then head_params)."""
    sizes = [A.numel(), b.numel(), C.numel(), c.numel()]
    parts = torch.split(th, sizes)
    return [q.reshape(r.shape) for q, r in zip(parts, (A, b, C, c))]


def test_head_terms_match_explicit_matrices_and_unrolled_hessian(head_problem, monkeypatch):
    """With y = C z* + c and cross-entropy: gauss_newton = J_yᵀ∇²ℓJ_y, dynamics = the Gauss–Newton + dynamics-curvature split
    Term B on the θ-block, head = Kᵀ(Σ ∂ℓ/∂y_i ∇²y_i)K — each with explicit matrices; their sum =
    torch.func.hessian through unrolled iterations of the full parameter vector."""
    z0, z, (A, B, x, b), C, c = head_problem
    count = SolveCounter(monkeypatch)
    H = LossHessian(tanh_cell, z, (A, B, x, b), ce_loss, (0, 3), head=linear_head, head_params=(C, c), batch_ndim=1)
    assert count.calls == 1 and H.dim == 25 + 5 + 20 + 4
    terms = {t: H.dense(t) for t in ("total", "gauss_newton", "dynamics", "head")}
    assert count.calls == 1 + 4 * 2
    th = torch.cat([A.reshape(-1), b, C.reshape(-1), c])
    P_f, M = 30, z.numel()

    def y_of(th):
        A_, b_, C_, c_ = _split_head(th, A, b, C, c)
        return linear_head(unrolled(tanh_cell, z0, A_, B, x, b_), C_, c_)

    ref_total = hessian(lambda th: ce_loss(y_of(th)))(th)
    Jy = jacrev(y_of)(th).reshape(-1, th.numel())
    y = y_of(th).detach()
    ref_gn = Jy.T @ hessian(ce_loss)(y).reshape(y.numel(), y.numel()) @ Jy
    # K = [Z 0; 0 I], Z = dz*/dθ_f (unrolled autodiff)
    Z = jacrev(lambda th: unrolled(tanh_cell, z0, *_split_head(th, A, b, C, c)[:1], B, x,
                                   _split_head(th, A, b, C, c)[1]))(th).reshape(M, -1)[:, :P_f]
    K = torch.block_diag(Z, torch.eye(24))
    g_y = grad(ce_loss)(y)
    Hy = hessian(lambda v: (g_y * linear_head(v[:M].reshape(z.shape), v[M:M + 20].reshape(4, 5), v[M + 20:])).sum())(
        torch.cat([z.reshape(-1), C.reshape(-1), c]))
    ref_head = K.T @ Hy @ K
    J = jacrev(lambda h: tanh_cell(h, A, B, x, b))(z).reshape(M, M)
    lam = torch.linalg.solve((torch.eye(M) - J).T, (g_y @ C).reshape(M))  # (∂y/∂h)ᵀ∇ℓ = g_y C

    def S(v):
        return lam @ tanh_cell(v[P_f:].reshape(z.shape), v[:25].reshape(5, 5), B, x, v[25:P_f]).reshape(M)

    HS = hessian(S)(torch.cat([th[:P_f], z.reshape(-1)]))
    IZ = torch.cat([torch.eye(P_f), Z])
    ref_dyn = torch.zeros_like(ref_total)
    ref_dyn[:P_f, :P_f] = IZ.T @ HS @ IZ
    assert rel_err(terms["total"], ref_total) < 1e-10
    assert rel_err(terms["gauss_newton"], ref_gn) < 1e-10
    assert rel_err(terms["dynamics"], ref_dyn) < 1e-10
    assert rel_err(terms["head"], ref_head) < 1e-10
    assert rel_err(terms["gauss_newton"] + terms["dynamics"] + terms["head"], ref_total) < 1e-8
    ev = torch.linalg.eigvalsh(terms["gauss_newton"])  # cross-entropy is convex in y
    assert ev.min() >= -1e-12 * ev.max()
    assert torch.linalg.eigvalsh(terms["head"]).min() < -1e-3  # bilinear C·z: indefinite


def test_head_products_have_the_pair_structure(head_problem):
    z0, z, (A, B, x, b), C, c = head_problem
    H = LossHessian(tanh_cell, z, (A, B, x, b), ce_loss, (0, 3), head=linear_head, head_params=(C, c), batch_ndim=1)
    gen = torch.Generator().manual_seed(2)
    v = ((torch.randn(5, 5, generator=gen), torch.randn(5, generator=gen)),
         (torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)))
    (hA, hb), (hC, hc) = H.hvp(v)
    assert hA.shape == A.shape and hb.shape == b.shape and hC.shape == C.shape and hc.shape == c.shape
    assert rel_err(H.flatten(H.hvp(v)), H.dense() @ H.flatten(v)) < 1e-12
    with pytest.raises(ValueError, match="pair"):
        H.hvp(v[0][0])
    with pytest.raises(ValueError, match="pair"):
        H.hvp((v[0], v[1][:1]))
    with pytest.raises(ValueError, match="without a head"):
        LossHessian(tanh_cell, z, (A, B, x, b), ce_loss, 0, head_params=(C,))


# --- create_graph: the products are differentiable again --------------------------------------


def test_products_without_create_graph_are_plain(problem):
    z0, z, (A, B, x, b), W, y = problem
    A = A.clone().requires_grad_()
    H = LossHessian(tanh_cell, z, (A, B, x, b), nonconvex_loss(W, y), 0, batch_ndim=1)
    assert not H.hvp(torch.ones_like(A)).requires_grad and not H.lam.requires_grad


def test_create_graph_gives_third_derivatives(head_problem):
    """∇_A ‖H(θ) v‖² through the split products with create_graph=True equals the same through
    torch.func on the unrolled map (third derivatives of the loss)."""
    z0, z, (A, B, x, b), C, c = head_problem
    gen = torch.Generator().manual_seed(5)
    vA, vb, vC, vc = (torch.randn(q.shape, generator=gen) for q in (A, b, C, c))
    A1, C1 = A.clone().requires_grad_(), C.clone().requires_grad_()
    H = LossHessian(tanh_cell, z, (A1, B, x, b), ce_loss, (0, 3), head=linear_head, head_params=(C1, c),
                    batch_ndim=1, create_graph=True)
    for term in ("total", "gauss_newton"):
        out = H.flatten(H.vp(((vA, vb), (vC, vc)), term))
        got = torch.autograd.grad((out**2).sum(), (A1, C1), retain_graph=True)  # z*, λ are shared

        def reference(A_, C_):
            def y_of(th):
                A__, b_, C__, c_ = _split_head(th, A, b, C, c)
                return linear_head(unrolled(tanh_cell, z0, A__, B, x, b_), C__, c_)

            th = torch.cat([A_.reshape(-1), b, C_.reshape(-1), c])
            v = torch.cat([vA.reshape(-1), vb, vC.reshape(-1), vc])
            if term == "total":
                hv = jvp(grad(lambda th: ce_loss(y_of(th))), (th,), (v,))[1]
            else:
                Jv = jvp(y_of, (th,), (v,))[1]
                _, pull = torch.func.vjp(y_of, th)
                hv = pull(jvp(grad(ce_loss), (y_of(th),), (Jv,))[1])[0]
            return (hv**2).sum()

        A2, C2 = A.clone().requires_grad_(), C.clone().requires_grad_()
        ref = torch.autograd.grad(reference(A2, C2), (A2, C2))
        for g_, r_ in zip(got, ref):
            assert rel_err(g_, r_) < 1e-9


# --- batching: a stack of vectors is one vmapped product ---------------------------------------


def test_flat_vp_on_a_stack_is_two_batched_solves(problem, monkeypatch):
    z0, z, params, W, y = problem
    H = LossHessian(tanh_cell, z, params, nonconvex_loss(W, y), (0, 3), batch_ndim=1)
    V = torch.randn(6, H.dim, generator=torch.Generator().manual_seed(4))
    count = SolveCounter(monkeypatch)
    for term in ("total", "gauss_newton", "dynamics"):
        before = count.calls
        stacked = H.flat_vp(V, term)
        assert count.calls - before == 2
        assert rel_err(stacked, torch.stack([H.flat_vp(v, term) for v in V])) < 1e-13
