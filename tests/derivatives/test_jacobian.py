"""Item 1: DEQ Jacobian products and dense matrices against the dense IFT formula
(Pacheco 2023, eq. deq-jacobian, explicit matrices + torch.linalg.solve) and unrolled autodiff."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp

import deqdiff
from deqdiff.derivatives import deq_jacobian, deq_jvp, deq_vjp
from tests.conftest import make_problem, rel_err, tanh_cell, unrolled
from tests.derivatives.helpers import TIGHT, SolveCounter, solve, unrolled_fn


def _dense_ift(A, B, x, b, z):
    """(I − J)⁻¹ ∂f/∂x and ∂f/∂A with explicit matrices for tanh(A z + B x + b)."""
    D = torch.diag(1 - z**2)
    M = torch.eye(len(z)) - D @ A
    dfdx = D @ B
    dfdA = torch.einsum("ij,k->ijk", D, z)  # ∂f_i/∂A_jk = D_ij z_k
    return torch.linalg.solve(M, dfdx), torch.linalg.solve(M, dfdA.reshape(len(z), -1)).reshape(dfdA.shape)


def test_jvp_vjp_jacobian_match_dense_formula(gen, monkeypatch):
    z0, p = make_problem(gen)
    A, B, x, b = (q.detach() for q in p)
    z = solve(tanh_cell, z0, (A, B, x, b))
    Jx, JA = _dense_ift(A, B, x, b, z)
    count = SolveCounter(monkeypatch)
    v = torch.randn(3, generator=gen)
    assert rel_err(deq_jvp(tanh_cell, z, (A, B, x, b), 2, v), Jx @ v) < 1e-12
    assert count.calls == 1
    u = torch.randn(5, generator=gen)
    assert rel_err(deq_vjp(tanh_cell, z, (A, B, x, b), 2, u), u @ Jx) < 1e-12
    assert count.calls == 2
    gA, gx = deq_vjp(tanh_cell, z, (A, B, x, b), (0, 2), u)
    assert rel_err(gA, torch.einsum("i,ijk->jk", u, JA)) < 1e-12 and rel_err(gx, u @ Jx) < 1e-12
    dA, dx = deq_jacobian(tanh_cell, z, (A, B, x, b), (0, 2))
    assert dA.shape == (5, 5, 5) and rel_err(dA, JA) < 1e-12 and rel_err(dx, Jx) < 1e-12


def test_jvp_with_several_arguments_matches_unrolled(gen):
    z0, p = make_problem(gen)
    A, B, x, b = (q.detach() for q in p)
    z = solve(tanh_cell, z0, (A, B, x, b))
    tA, tb = torch.randn_like(A), torch.randn_like(b)
    got = deq_jvp(tanh_cell, z, (A, B, x, b), (0, 3), (tA, tb))
    ref = jvp(lambda A, b: unrolled(tanh_cell, z0, A, B, x, b), (A, b), (tA, tb))[1]
    assert rel_err(got, ref) < 1e-11


def test_batched_per_sample_jacobian(gen):
    z0, p = make_problem(gen, batch=4)
    A, B, x, b = (q.detach() for q in p)
    z = solve(tanh_cell, z0, (A, B, x, b), batch_ndim=1)
    JA, Jx = deq_jacobian(tanh_cell, z, (A, B, x, b), (0, 2), batch_ndim=1)
    rA, rx = jacrev(unrolled_fn(tanh_cell, z0), argnums=(0, 2))(A, B, x, b)
    assert JA.shape == (4, 5, 5, 5) and rel_err(JA, rA) < 1e-11
    assert Jx.shape == (4, 5, 3)
    assert rel_err(Jx, torch.stack([rx[s, :, s] for s in range(4)])) < 1e-11
    for s in range(4):  # each block equals the dense IFT formula of that sample alone
        assert rel_err(Jx[s], _dense_ift(A, B, x[s], b, z[s])[0]) < 1e-11


def test_results_keep_their_graph(gen):
    """A loss on dz*/dx·v differentiated w.r.t. A: the graph goes through z*."""
    z0, p = make_problem(gen)
    A, B, x, b = (q.detach() for q in p)
    A.requires_grad_()
    v = torch.randn(3, generator=gen)

    def pattern(dz):
        return torch.autograd.grad((dz**2).sum(), A)[0]

    z = deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, **TIGHT)
    got = pattern(deq_jvp(tanh_cell, z, (A, B, x, b), 2, v))
    ref = pattern(jvp(lambda x: unrolled(tanh_cell, z0, A, B, x, b), (x,), (v,))[1])
    assert rel_err(got, ref) < 1e-10


class Cell(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.lin_z = nn.Linear(n, n, bias=False)
        self.lin_x = nn.Linear(m, n)
        with torch.no_grad():
            self.lin_z.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin_z.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin_z(z) + self.lin_x(x))


def test_module_parameter_dict(gen):
    torch.manual_seed(0)
    cell = Cell(5, 3)
    params = {k: v.detach() for k, v in cell.named_parameters()}
    x = torch.randn(2, 3, generator=gen)

    def f(z, p, x):
        return functional_call(cell, p, (z, x))

    with torch.no_grad():
        z = deqdiff.DEQ(cell, z_init=lambda x: x.new_zeros(len(x), 5), **TIGHT)(x)  # z* from the layer; derivatives from its cell
    jac = deq_jacobian(f, z, (params, x), 0, batch_ndim=1)
    ref = jacrev(lambda p: unrolled(f, torch.zeros(2, 5), p, x))(params)
    assert set(jac) == set(params)
    for k in params:
        assert rel_err(jac[k], ref[k]) < 1e-11
    u = torch.randn(2, 5, generator=gen)
    g = deq_vjp(f, z, (params, x), 0, u, batch_ndim=1)
    _, pull = vjp(lambda p: unrolled(f, torch.zeros(2, 5), p, x), params)
    for k, r in pull(u)[0].items():
        assert rel_err(g[k], r) < 1e-11


def test_iterative_backward_solver(gen):
    z0, p = make_problem(gen)
    A, B, x, b = (q.detach() for q in p)
    z = solve(tanh_cell, z0, (A, B, x, b))
    v = torch.randn(3, generator=gen)
    got = deq_jvp(tanh_cell, z, (A, B, x, b), 2, v, solver="gmres", tol=1e-12)
    assert rel_err(got, _dense_ift(A, B, x, b, z)[0] @ v) < 1e-10


def test_products_under_vmap_are_one_batched_solve(gen, monkeypatch):
    """torch.func.vmap over tangents/cotangents: equal to the loop, and one (batched) solve."""
    z0, p = make_problem(gen, batch=3)
    A, B, x, b = (q.detach() for q in p)
    z = solve(tanh_cell, z0, (A, B, x, b), batch_ndim=1)
    V, U = torch.randn(4, 5, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    loop_jvp = torch.stack([deq_jvp(tanh_cell, z, (A, B, x, b), 0, v, batch_ndim=1) for v in V])
    loop_vjp = torch.stack([deq_vjp(tanh_cell, z, (A, B, x, b), 0, u, batch_ndim=1) for u in U])
    count = SolveCounter(monkeypatch)
    jv = torch.func.vmap(lambda v: deq_jvp(tanh_cell, z, (A, B, x, b), 0, v, batch_ndim=1))(V)
    vj = torch.func.vmap(lambda u: deq_vjp(tanh_cell, z, (A, B, x, b), 0, u, batch_ndim=1))(U)
    assert count.calls == 2
    assert rel_err(jv, loop_jvp) < 1e-13 and rel_err(vj, loop_vjp) < 1e-13
    Jfull = jacrev(unrolled_fn(tanh_cell, z0))(A, B, x, b).reshape(15, 25)
    assert rel_err(jv.reshape(4, 15), V.reshape(4, 25) @ Jfull.T) < 1e-11
