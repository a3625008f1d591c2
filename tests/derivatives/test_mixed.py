"""Item 2: the mixed derivative H_{z*,tx} = ∂²z*/∂t∂x (Pacheco 2023, eq. hessian-t, sign
corrected) against an explicit dense formula, finite differences of J_{z*,t} and unrolled
autodiff; the gradient of a loss on ∂NN/∂t through a post-network."""

from __future__ import annotations

import torch
from torch.func import jacrev, jvp

import deqdiff
from deqdiff.derivatives import deq_second_jvp, derivative_loss_grad, mixed_jacobian, mixed_jvp, mixed_vjp
from tests.conftest import rel_err, unrolled
from tests.derivatives.helpers import TIGHT, SolveCounter, make_time_problem, solve, time_cell


def dense_parts(A, U, a, z):
    """Explicit matrices for tanh(A z + U x + a t + b) at z*: M = I − J, z_t, Z_x."""
    s1 = 1 - z**2
    D = torch.diag(s1)
    M = torch.eye(len(z)) - D @ A
    return M, torch.linalg.solve(M, D @ a), torch.linalg.solve(M, D @ U), -2 * z * s1


def dense_mixed(A, U, a, z):
    """(I − J) H = σ'' ⊙ s_t ⊙ S_x with total s_t = A z_t + a, S_x = A Z_x + U — i.e. seed eq.
    hessian-t with + inside the bracket and total (not partial) Hessians of f."""
    M, z_t, Z_x, s2 = dense_parts(A, U, a, z)
    return torch.linalg.solve(M, (s2 * (A @ z_t + a))[:, None] * (A @ Z_x + U))


def seed_literal(A, U, a, z):
    """Seed eq. hessian-t read literally: −(J − I)⁻¹ [H_{f,tx} − 𝐇_{f,zx} ×₂ J_{z*,t}] with
    partial Hessians of f (kept to document that it is not the mixed derivative)."""
    M, z_t, Z_x, s2 = dense_parts(A, U, a, z)
    H_ftx = (s2 * a)[:, None] * U  # ∂²f/∂t∂x
    H_fzx_zt = (s2 * (A @ z_t))[:, None] * U  # Σ_j ∂²f_i/∂z_j∂x_k (z_t)_j
    return torch.linalg.solve(M, H_ftx - H_fzx_zt)


def unrolled_mixed(z0, A, U, a, b, x, t):
    return jacrev(lambda x: jvp(lambda t: unrolled(time_cell, z0, A, U, a, b, x, t), (t,), (torch.ones_like(t),))[1])(x)


def test_mixed_jacobian_matches_dense_formula_fd_and_unrolled(gen):
    z0, p = make_time_problem(gen)
    A, U, a, b, x, t = p
    z = solve(time_cell, z0, p)
    H = mixed_jacobian(time_cell, z, p, t_argnum=5, x_argnums=4)
    ref = dense_mixed(A, U, a, z)
    assert H.shape == (4, 3)
    assert rel_err(H, ref) < 1e-12
    assert rel_err(H, unrolled_mixed(z0, *p)) < 1e-10
    assert rel_err(seed_literal(A, U, a, z), ref) > 1e-2  # the literal seed formula is not it

    def J_t(xx):  # J_{z*,t} at a re-solved fixed point
        zz = solve(time_cell, z0, (A, U, a, b, xx, t))
        return dense_parts(A, U, a, zz)[1]

    eps = 1e-5
    fd = torch.stack([(J_t(x + eps * e) - J_t(x - eps * e)) / (2 * eps) for e in torch.eye(3)], 1)
    assert rel_err(H, fd) < 1e-8


def test_products_match_dense_and_cost_three_solves(gen, monkeypatch):
    z0, p = make_time_problem(gen)
    A, U, a, b, x, t = p
    z = solve(time_cell, z0, p)
    ref = dense_mixed(A, U, a, z)
    v, u = torch.randn(3, generator=gen), torch.randn(4, generator=gen)
    count = SolveCounter(monkeypatch)
    assert rel_err(mixed_jvp(time_cell, z, p, 5, 4, v), ref @ v) < 1e-12
    assert count.calls == 3
    assert rel_err(mixed_vjp(time_cell, z, p, 5, 4, u), u @ ref) < 1e-12
    assert count.calls == 6
    z_t = dense_parts(A, U, a, z)[1]
    assert rel_err(mixed_jvp(time_cell, z, p, 5, 4, v, z_t=z_t), ref @ v) < 1e-12
    assert rel_err(mixed_vjp(time_cell, z, p, 5, 4, u, z_t=z_t), u @ ref) < 1e-12
    assert count.calls == 10  # 2 each with z_t given


def test_mixed_wrt_weights_batched(gen):
    """∂²z*/∂t∂A (shared weight) and ∂²z*/∂t∂x (per-sample) with per-sample t."""
    z0, p = make_time_problem(gen, batch=3)
    A, U, a, b, x, t = p
    z = solve(time_cell, z0, p, batch_ndim=1)
    HA, Hx = mixed_jacobian(time_cell, z, p, 5, (0, 4), batch_ndim=1)
    ref_A, ref_x = jacrev(
        lambda A, x: jvp(lambda t: unrolled(time_cell, z0, A, U, a, b, x, t), (t,), (torch.ones_like(t),))[1],
        argnums=(0, 1))(A, x)
    assert HA.shape == (3, 4, 4, 4) and rel_err(HA, ref_A) < 1e-10
    assert Hx.shape == (3, 4, 3) and rel_err(Hx, torch.stack([ref_x[s, :, s] for s in range(3)])) < 1e-10
    for s in range(3):
        assert rel_err(Hx[s], dense_mixed(A, U, a, z[s])) < 1e-11


def test_general_second_directional_derivative(gen, monkeypatch):
    z0, p = make_time_problem(gen)
    A, U, a, b, x, t = p
    z = solve(time_cell, z0, p)
    u = (torch.randn(4, 4, generator=gen), None, torch.randn(3, generator=gen))
    v = (None, torch.randn(4, generator=gen), torch.randn(3, generator=gen))

    def g(A, a, x):
        return unrolled(time_cell, z0, A, U, a, b, x, t)

    zero = lambda q, r: torch.zeros_like(r) if q is None else q
    prim = (A, a, x)
    ref = jvp(lambda *q: jvp(g, q, tuple(zero(w, r) for w, r in zip(u, prim)))[1], prim,
              tuple(zero(w, r) for w, r in zip(v, prim)))[1]
    count = SolveCounter(monkeypatch)
    assert rel_err(deq_second_jvp(time_cell, z, p, (0, 2, 4), u, v), ref) < 1e-10
    assert count.calls == 3
    deq_second_jvp(time_cell, z, p, (0, 2, 4), u, u)
    assert count.calls == 5


def test_gradient_of_loss_on_time_derivative_through_post_network(gen, monkeypatch):
    """ℓ(∂NN/∂t), NN = n_post(z*), gradient w.r.t. DEQ and post-network weights (Pacheco 2023)."""
    z0, p = make_time_problem(gen, batch=5)
    A, U, a, b, x, t = p
    W = torch.randn(2, 4, generator=gen)
    c = torch.randn(2, generator=gen)
    target = torch.randn(5, 2, generator=gen)
    n_post = lambda z, W, c: torch.tanh(z @ W.T + c)
    loss = lambda y_t: ((y_t - target) ** 2).sum()
    z = solve(time_cell, z0, p, batch_ndim=1)
    count = SolveCounter(monkeypatch)
    value, (gA, gU), (gW, gc) = derivative_loss_grad(
        time_cell, z, p, 5, (0, 1), n_post, loss, post_params=(W, c), batch_ndim=1)
    assert count.calls == 3

    def reference(fp):
        A_, U_, W_, c_ = (q.clone().requires_grad_() for q in (A, U, W, c))
        y_t = jvp(lambda t: n_post(fp(A_, U_, t), W_, c_), (t,), (torch.ones_like(t),))[1]
        L = loss(y_t)
        return L, torch.autograd.grad(L, (A_, U_, W_, c_))

    ref_v, ref_g = reference(lambda A_, U_, t: unrolled(time_cell, z0, A_, U_, a, b, x, t))
    assert rel_err(value, ref_v) < 1e-11
    for got, ref in zip((gA, gU, gW, gc), ref_g):
        assert rel_err(got, ref) < 1e-10
    _, eng_g = reference(  # the same through the engine's own autodiff
        lambda A_, U_, t: deqdiff.fixed_point(time_cell, z0, A_, U_, a, b, x, t, batch_ndim=1, **TIGHT))
    for got, ref in zip((gA, gU), eng_g):
        assert rel_err(got, ref) < 1e-10


def test_loss_gradient_with_create_graph_gives_its_hvp(gen):
    """create_graph=True: ∇_A⟨∇_θ ℓ(∂NN/∂t), v⟩ (an HVP of the physics loss) equals the same through
    torch.func on the unrolled map; without it the result is plain."""
    z0, p = make_time_problem(gen, batch=3)
    A, U, a, b, x, t = p
    W = torch.randn(2, 4, generator=gen)
    target = torch.randn(3, 2, generator=gen)
    n_post = lambda z, W: torch.tanh(z @ W.T)
    loss = lambda y_t: ((y_t - target) ** 2).sum()
    z = solve(time_cell, z0, p, batch_ndim=1)
    vA, vU, vW = (torch.randn(q.shape, generator=gen) for q in (A, U, W))
    A1, U1, W1 = (q.clone().requires_grad_() for q in (A, U, W))
    plain = derivative_loss_grad(time_cell, z, (A1, U1, a, b, x, t), 5, (0, 1), n_post, loss, post_params=(W1,),
                                 batch_ndim=1)
    assert not plain[1][0].requires_grad and not plain[2][0].requires_grad
    _, (gA, gU), (gW,) = derivative_loss_grad(time_cell, z, (A1, U1, a, b, x, t), 5, (0, 1), n_post, loss,
                                              post_params=(W1,), batch_ndim=1, create_graph=True)
    got = torch.autograd.grad((gA * vA).sum() + (gU * vU).sum() + (gW * vW).sum(), (A1, U1, W1))

    def L(A_, U_, W_):
        y_t = jvp(lambda t: n_post(unrolled(time_cell, z0, A_, U_, a, b, x, t), W_), (t,), (torch.ones_like(t),))[1]
        return loss(y_t)

    ref = jvp(torch.func.grad(L, argnums=(0, 1, 2)), (A, U, W), (vA, vU, vW))[1]
    for g_, r_ in zip(got, ref):
        assert rel_err(g_, r_) < 1e-9


def test_mixed_products_under_vmap(gen):
    """A stack of directions through torch.func.vmap equals the loop over them."""
    z0, p = make_time_problem(gen, batch=2)
    z = solve(time_cell, z0, p, batch_ndim=1)
    V = torch.randn(5, 2, 3, generator=gen)
    U_ = torch.randn(5, 2, 4, generator=gen)
    jv = torch.func.vmap(lambda v: mixed_jvp(time_cell, z, p, 5, 4, v, batch_ndim=1))(V)
    vj = torch.func.vmap(lambda u: mixed_vjp(time_cell, z, p, 5, 0, u, batch_ndim=1))(U_)
    assert rel_err(jv, torch.stack([mixed_jvp(time_cell, z, p, 5, 4, v, batch_ndim=1) for v in V])) < 1e-13
    assert rel_err(vj, torch.stack([mixed_vjp(time_cell, z, p, 5, 0, u, batch_ndim=1) for u in U_])) < 1e-13
