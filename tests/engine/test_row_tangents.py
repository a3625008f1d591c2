"""Gradients w.r.t. a per-row scalar input (the time of a physics-informed DEQ) come from one
tangent solve per input, shared by every output differentiated, when the backward pass wants
no other gradient; they agree with unrolled autodiff to every order and on every entry point."""

from __future__ import annotations

import gc

import pytest
import torch

import deqdiff
from tests.conftest import make_problem, rel_err, tanh_cell, track_linearizations, unrolled


def _problem(gen, rows=4, n=6):
    z0, (A, B, t, b) = make_problem(gen, n=n, m=1, batch=rows, rho=0.5)
    C = torch.randn(3, n, generator=gen).requires_grad_()
    return z0, A, B, t, b, C


def _solve(mode, z0, A, B, t, b, info=None):
    if mode == "unrolled":
        return unrolled(tanh_cell, z0, A, B, t, b)
    z, i = deqdiff.fixed_point(tanh_cell, z0, A, B, t, b, tol=1e-13, max_iter=500, return_info=True)
    if info is not None:
        info.append(i)
    return z


def _physics_step(mode, z0, A, B, t, b, C, info=None):
    """dy/dt per output by reverse mode, then the gradient of a loss on them."""
    y = _solve(mode, z0, A, B, t, b, info) @ C.T
    dy = [torch.autograd.grad(y[:, i].sum(), t, create_graph=True)[0] for i in range(y.shape[1])]
    loss = sum(((d - y[:, i : i + 1]) ** 2).mean() for i, d in enumerate(dy)) + (y**3).mean()
    return dy, torch.autograd.grad(loss, [A, B, b, C, t])


def test_derivatives_in_time_and_the_loss_gradient_match_unrolled_with_three_solves(gen):
    """Three outputs, dy/dt each, then the weights' gradient: one tangent solve, its adjoint and
    the z* adjoint (reverse mode per output would solve seven systems)."""
    problem = _problem(gen)
    info: list = []
    dy, grads = _physics_step("deqdiff", *problem, info=info)
    dy_ref, grads_ref = _physics_step("unrolled", *problem)
    for a, r in zip([*dy, *grads], [*dy_ref, *grads_ref]):
        assert rel_err(a, r) < 1e-10
    kinds = [d.kind for d in info[0].derivatives]
    assert kinds == ["derivative", "derivative (transposed)", "derivative (transposed)"], kinds


@pytest.mark.parametrize("wanted, solves", [("t", ["derivative"]), ("t and A", ["derivative (transposed)"] * 3)])
def test_first_order_passes_share_one_tangent_or_solve_an_adjoint_each(gen, wanted, solves):
    """Three outputs differentiated in turn: one tangent solve serves them all when only the time's
    gradient is wanted; a pass that also wants the weights' solves its own adjoint."""
    z0, A, B, t, b, C = _problem(gen)
    info: list = []
    y = _solve("deqdiff", z0, A, B, t, b, info) @ C.T
    y_ref = unrolled(tanh_cell, z0, A, B, t, b) @ C.T
    inputs = [t] if wanted == "t" else [t, A]
    for i in range(3):
        got = torch.autograd.grad(y[:, i].sum(), inputs, retain_graph=True)
        ref = torch.autograd.grad(y_ref[:, i].sum(), inputs, retain_graph=True)
        assert all(rel_err(a, r) < 1e-10 for a, r in zip(got, ref))
    assert [d.kind for d in info[0].derivatives] == solves


def test_a_non_leaf_time_input_takes_the_tangent_route(gen):
    z0, A, B, s, b, C = _problem(gen)
    t = 2 * s  # the engine can tell that only this input's gradient is wanted
    info: list = []
    y = _solve("deqdiff", z0, A, B, t, b, info) @ C.T
    (got,) = torch.autograd.grad(y.sum(), s, retain_graph=True)
    (ref,) = torch.autograd.grad((unrolled(tanh_cell, z0, A, B, t, b) @ C.T).sum(), s)
    assert rel_err(got, ref) < 1e-10
    assert [d.kind for d in info[0].derivatives] == ["derivative"]


def test_gradcheck_and_gradgradcheck_in_the_time_input_with_batched_grads(gen):
    z0, A, B, t, b, C = _problem(gen, rows=3, n=4)

    def fn(t):
        return _solve("deqdiff", z0, A, B, t, b) @ C.T

    t = t.detach().requires_grad_()
    assert torch.autograd.gradcheck(fn, (t,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, (t,), check_batched_grad=True)


@pytest.mark.parametrize("transform", ["jacrev", "grad", "is_grads_batched"])
def test_other_entry_points_agree_with_unrolled(gen, transform):
    z0, A, B, t, b, C = _problem(gen, rows=3, n=4)

    def fn(mode, t):
        return _solve(mode, z0, A, B, t, b) @ C.T

    if transform == "jacrev":
        got, ref = (torch.func.jacrev(lambda t, m=m: fn(m, t))(t) for m in ("deqdiff", "unrolled"))
    elif transform == "grad":
        got, ref = (torch.func.grad(lambda t, m=m: fn(m, t).pow(2).sum())(t) for m in ("deqdiff", "unrolled"))
    else:
        basis = torch.eye(t.shape[0] * 3).reshape(-1, t.shape[0], 3)
        got, ref = (torch.autograd.grad(fn(m, t), t, basis, is_grads_batched=True)[0] for m in ("deqdiff", "unrolled"))
    assert rel_err(got, ref) < 1e-10


def test_the_cached_tangent_keeps_no_reference_cycle(gen, monkeypatch):
    """Everything of a step is freed by reference counting alone: the tangent kept for further
    outputs must not tie the fixed-point node to itself."""
    problem = _problem(gen)
    lins = track_linearizations(monkeypatch)
    gc.collect()
    gc.disable()
    try:
        dy, grads = _physics_step("deqdiff", *problem)
        del dy, grads
        assert lins and all(r() is None for r in lins)
    finally:
        gc.enable()
