"""A first-order backward through a fixed point frees the linearization of f at z* (its vjp
graph: one evaluation's activations) before it records the parameters' vjp, so the two graphs
are never held together; higher orders (create_graph) and dense factorizations keep it."""

from __future__ import annotations


import pytest
import torch

import deqdiff
from deqdiff.engine.operators import FixedPointJacobian
from tests.conftest import make_problem, rel_err, tanh_cell, track_linearizations


def _dense_gradient(z0, A, B, x, b):
    """d(sum z*)/dA by the implicit function theorem with dense float64 algebra."""
    with torch.no_grad():
        z = deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, tol=1e-13, max_iter=2000)
    z = z.detach()
    pre = z @ A.T + x @ B.T + b
    s = 1 - torch.tanh(pre) ** 2  # (S, n)
    grads = torch.zeros_like(A)
    for i in range(z.shape[0]):
        J = s[i, :, None] * A
        w = torch.linalg.solve((torch.eye(A.shape[0]) - J).T, torch.ones(A.shape[0]))
        grads += torch.outer(w * s[i], z[i])
    return grads


def _tracked(monkeypatch):
    """Weak references to every linearization of a fixed point built from now on, and a cell
    that records, at each call under gradient recording, whether they are all freed."""
    lins = track_linearizations(monkeypatch)
    calls: list[tuple[int, bool]] = []

    def f(z, *params):
        if torch.is_grad_enabled() and lins:
            calls.append((len(lins), all(r() is None for r in lins)))
        return tanh_cell(z, *params)

    return f, lins, calls


@pytest.mark.parametrize("backward_solver", ["auto", "richardson", "gmres"])
def test_first_order_backward_frees_the_linearization_before_the_parameter_vjp(gen, monkeypatch, backward_solver):
    """The parameters' vjp either differentiates the graph of f that the adjoint solve holds
    (no second evaluation of f) or, where the solve dropped it (restricted to rows), records f
    only after every linearization is freed."""
    z0, (A, B, x, b) = make_problem(gen, n=80, batch=3, rho=0.5)
    f, lins, calls = _tracked(monkeypatch)
    held = []
    reuse = FixedPointJacobian.held_param_vjp
    monkeypatch.setattr(FixedPointJacobian, "held_param_vjp",
                        lambda self, u, idx: held.append(reuse(self, u, idx)) or held[-1])
    z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=500, backward_solver=backward_solver)
    (gA,) = torch.autograd.grad(z.sum(), A)
    assert lins and calls and len(held) == 1
    if held[0] is None:
        assert calls[-1] == (len(lins), True), "the linearizations must be freed before the parameters' vjp records f"
    else:
        assert calls[-1][0] == len(lins) and not calls[-1][1], "the last evaluation of f is the solve's own"
        assert len(calls) == len(lins), "one evaluation of f per linearization, none for the vjp"
    assert all(r() is None for r in lins)
    assert rel_err(gA, _dense_gradient(z0, A, B, x, b)) < 1e-9


def test_retained_graph_linearizes_again_with_the_same_gradient(gen, monkeypatch):
    z0, (A, B, x, b) = make_problem(gen, n=80, batch=3, rho=0.5)
    f, lins, _ = _tracked(monkeypatch)
    z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=500, backward_solver="richardson")
    (g1,) = torch.autograd.grad(z.sum(), A, retain_graph=True)
    first = len(lins)  # Richardson re-linearizes on the rows still running as others converge
    (g2,) = torch.autograd.grad(z.sum(), A)
    assert first >= 1 and len(lins) == 2 * first
    assert rel_err(g1, g2) < 1e-10


def test_higher_orders_and_dense_factorizations_keep_the_linearization(gen, monkeypatch):
    z0, (A, B, x, b) = make_problem(gen, n=80, batch=3, rho=0.5)
    f, lins, calls = _tracked(monkeypatch)
    z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=500, backward_solver="richardson")
    (gA,) = torch.autograd.grad(z.sum(), A, create_graph=True)
    assert calls[-1][1] is False  # kept: second-order solves reuse it
    assert lins[0]() is not None
    # a dense LU costs N products to rebuild: kept across retained backward passes
    z = deqdiff.fixed_point(f, z0, A, B, x, b, tol=1e-12, max_iter=500, backward_solver="dense")
    before = len(lins)
    torch.autograd.grad(z.sum(), A, retain_graph=True)
    torch.autograd.grad(z.sum(), A)
    assert len(lins) == before + 1
