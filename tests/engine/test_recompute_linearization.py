"""``fixed_point(..., recompute_linearization=True)``: the derivative solves hold no vjp graph of
f at z* (each product evaluates f again, as gradient checkpointing recomputes activations:
Chen et al. 2016), with the derivatives of the held-graph path to every order; and a first-order
backward frees the full graph before a solver restricts the operator to the rows still running."""

from __future__ import annotations


import pytest
import torch

import deqdiff
import deqdiff.engine.operators as operators
from tests.conftest import make_problem, rel_err, tanh_cell, track_linearizations


def _dense_gradient(z0, A, B, x, b):
    """d(sum z*)/dA by the implicit function theorem with dense float64 algebra."""
    with torch.no_grad():
        z = deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, tol=1e-13, max_iter=2000)
    s = 1 - torch.tanh(z @ A.T + x @ B.T + b) ** 2  # (S, n)
    grads = torch.zeros_like(A)
    for i in range(z.shape[0]):
        J = s[i, :, None] * A
        w = torch.linalg.solve((torch.eye(A.shape[0]) - J).T, torch.ones(A.shape[0]))
        grads += torch.outer(w * s[i], z[i])
    return grads


def _spread_problem(gen, batch=12, n=40):
    """Rows whose contraction rates differ (ρ from 0.1 to 0.9 through the per-row input scale):
    the backward solves finish rows at different iterations and restrict to the rest."""
    z0, (A, B, x, b) = make_problem(gen, n=n, m=3, batch=batch, rho=0.95)
    with torch.no_grad():
        x.mul_(torch.linspace(4.0, 0.05, batch)[:, None])  # large inputs saturate tanh: fast rows
    return z0, (A, B, x, b)


def _counting(monkeypatch):
    """Counts held graph builds (``_Pullback.build`` or ``record`` that keeps one) and evaluations
    of f under gradient recording."""
    held = []
    original = operators._Pullback.build

    def build(self):
        keeps = self.hold and self.pull is None
        original(self)
        if keeps:
            held.append(self)

    monkeypatch.setattr(operators._Pullback, "build", build)
    original_record = operators._Pullback.record

    def record(self):  # the graph plain autograd differentiates
        keeps = self.hold and self.graph is None
        graph = original_record(self)
        if keeps:
            held.append(self)
        return graph

    monkeypatch.setattr(operators._Pullback, "record", record)
    evals = []

    def f(z, *p):
        if torch.is_grad_enabled():
            evals.append(z.shape[0] if z.dim() > 1 else 1)
        return tanh_cell(z, *p)

    return f, held, evals


@pytest.mark.parametrize("backward_solver", ["auto", "richardson", "anderson", "gmres", "dense"])
def test_recomputed_gradients_equal_the_held_graph_and_dense_references(gen, monkeypatch, backward_solver):
    z0, (A, B, x, b) = _spread_problem(gen)
    f, held, evals = _counting(monkeypatch)
    grads = {}
    for recompute in (False, True):
        held.clear()
        evals.clear()
        z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=2000, backward_solver=backward_solver,
                                recompute_linearization=recompute, on_fail="raise")
        grads[recompute] = torch.autograd.grad(z.sum(), (A, B, x, b))
        if recompute:
            assert not held, "recompute_linearization must not keep a vjp graph of f"
            assert len(evals) >= 2, "each product evaluates f again"
    for g_held, g_rec in zip(grads[False], grads[True]):
        assert rel_err(g_rec, g_held) < 1e-10
    assert rel_err(grads[True][0], _dense_gradient(z0, A, B, x, b)) < 1e-9


def test_higher_orders_and_forward_mode_are_exact_with_recomputation(gen):
    z0, (A, B, x, b) = make_problem(gen, n=6, m=3, batch=3, rho=0.6)

    def derivatives(recompute: bool):
        kw = dict(tol=1e-13, max_iter=500, backward_solver="gmres", backward_tol=1e-13,
                  recompute_linearization=recompute)
        z = deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, **kw)
        gA, gx = torch.autograd.grad(z.square().sum(), (A, x), create_graph=True)
        hess = torch.autograd.grad((gA.sin().sum() + gx.square().sum()), (A, B, b))  # second order
        t = torch.randn_like(A, generator=torch.Generator().manual_seed(5))
        _, jvp = torch.func.jvp(lambda a: deqdiff.fixed_point(tanh_cell, z0, a, B.detach(), x.detach(), b.detach(),
                                                                  **kw), (A.detach(),), (t,))
        jac = torch.func.jacrev(lambda bb: deqdiff.fixed_point(tanh_cell, z0, A.detach(), B.detach(), x.detach(), bb,
                                                                   **kw))(b.detach())
        return (gA, gx, *hess, jvp, jac)

    held, recomputed = derivatives(False), derivatives(True)
    for a, r in zip(held, recomputed):
        assert rel_err(r, a) < 1e-9
    # and against autodiff through many plain iterations (ρ = 0.6: 200 steps reach rounding)
    def unrolled(A_):
        z = z0
        for _ in range(200):
            z = tanh_cell(z, A_, B, x, b)
        return z
    gA_ref, gx_ref = torch.autograd.grad(unrolled(A).square().sum(), (A, x), create_graph=True)
    hess_ref = torch.autograd.grad(gA_ref.sin().sum() + gx_ref.square().sum(), (A, B, b))
    for r, ref in zip(recomputed[:5], (gA_ref, gx_ref, *hess_ref)):
        assert rel_err(r, ref) < 1e-8


def test_first_order_backward_frees_the_full_graph_before_restricting_to_rows(gen, monkeypatch):
    """Anderson's linear solve shrinks to its running rows after 8 iterations; the restricted
    linearization is built after the full one is freed, so two graphs of f are never held."""
    z0, (A, B, x, b) = _spread_problem(gen)
    lins = track_linearizations(monkeypatch)
    held_at_build = []

    def f(z, *p):
        if torch.is_grad_enabled():  # a graph of f is being recorded: how many are held now?
            alive = [r() for r in lins]
            held_at_build.append(sum(lin is not None and lin.graphs[1].held for lin in alive))
        return tanh_cell(z, *p)

    z, info = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=2000, backward_solver="anderson",
                                  return_info=True)
    (gA,) = torch.autograd.grad(z.sum(), A)
    assert len(lins) >= 2, "the backward solve must have restricted its operator to the rows still running"
    assert held_at_build and max(held_at_build) == 0, held_at_build
    assert rel_err(gA, _dense_gradient(z0, A, B, x, b)) < 1e-9
    # with create_graph the full linearization stays for the second-order solves
    lins.clear()
    held_at_build.clear()
    z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=2000, backward_solver="anderson")
    torch.autograd.grad(z.sum(), A, create_graph=True)
    assert len(lins) >= 2 and lins[0]() is not None and lins[0]().graphs[1].held


def test_recompute_linearization_must_be_a_bool(gen):
    z0, params = make_problem(gen)
    with pytest.raises(TypeError, match="recompute_linearization must be True or False"):
        deqdiff.fixed_point(tanh_cell, z0, *params, recompute_linearization="yes")


def test_vmap_of_grad_through_a_recomputed_solve_equals_the_batched_gradient(gen):
    z0, (A, B, x, b) = make_problem(gen, n=5, m=3, batch=4, rho=0.5)
    kw = dict(tol=1e-12, max_iter=500, backward_solver="richardson")
    ref = torch.autograd.grad(deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, **kw).sum(), x)[0]

    def per_sample(xi):
        return deqdiff.fixed_point(tanh_cell, z0[0], A.detach(), B.detach(), xi, b.detach(),
                                   recompute_linearization=True, **kw).sum()

    batched = torch.func.vmap(torch.func.grad(per_sample))(x.detach())
    assert rel_err(batched, ref) < 1e-10
