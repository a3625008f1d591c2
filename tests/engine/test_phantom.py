"""Phantom gradients (Geng et al. 2021): k damped unrolled steps from z*, against their definition
and against the implicit gradient they approach as k grows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqdiff
from deqdiff import PhantomGrad
from tests.conftest import make_problem, rel_err, tanh_cell


def _grads(z, params):
    loss = (z**2).sum() + z[..., 0].sum()
    return torch.autograd.grad(loss, params)


def _definition(z_star, params, k, tau):
    z = z_star.detach()
    for _ in range(k):
        z = (1 - tau) * z + tau * tanh_cell(z, *params)
    return z


def test_phantom_gradient_equals_k_damped_steps_from_z_star(gen):
    z0, params = make_problem(gen, batch=4)
    z_star = deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13)
    z = deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13, grad=PhantomGrad(steps=3, damping=0.7))
    assert rel_err(z, z_star) < 1e-12  # at a fixed point the k steps leave the value unchanged
    for a, r in zip(_grads(z, params), _grads(_definition(z_star, params, 3, 0.7), params)):
        assert rel_err(a, r) < 1e-12


def test_phantom_gradient_converges_to_the_implicit_gradient(gen):
    z0, params = make_problem(gen, batch=3, rho=0.6)
    exact = _grads(deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13), params)
    errors = []
    for k in (1, 4, 16, 120):
        z = deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13, grad=PhantomGrad(steps=k, damping=0.5))
        errors.append(max(rel_err(a, r) for a, r in zip(_grads(z, params), exact)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-9, errors


def test_higher_orders_differentiate_the_k_step_map(gen):
    z0, params = make_problem(gen, batch=2)
    A, B, x, b = params
    z_star = deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13)
    z = deqdiff.fixed_point(tanh_cell, z0, *params, tol=1e-13, grad="phantom")
    ref = _definition(z_star, params, PhantomGrad().steps, PhantomGrad().damping)

    def second(out):
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), (A, b))

    for a, r in zip(second(z), second(ref)):
        assert rel_err(a, r) < 1e-12


def test_forward_mode_and_torch_func_follow_the_same_graph(gen):
    z0, params = make_problem(gen, batch=2)
    A, B, x, b = (p.detach() for p in params)
    mode = PhantomGrad(steps=4, damping=0.8)

    def out(b):
        return deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, tol=1e-13, grad=mode)

    z_star = deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, tol=1e-13)
    t = torch.randn_like(b)
    _, jvp = torch.func.jvp(out, (b,), (t,))
    _, ref = torch.func.jvp(lambda b: _definition(z_star, (A, B, x, b), 4, 0.8), (b,), (t,))
    assert rel_err(jvp, ref) < 1e-12
    g = torch.func.grad(lambda b: out(b).pow(2).sum())(b)
    g_ref = torch.func.grad(lambda b: _definition(z_star, (A, B, x, b), 4, 0.8).pow(2).sum())(b)
    assert rel_err(g, g_ref) < 1e-12


def test_no_grad_returns_z_star_without_unrolling(gen):
    z0, params = make_problem(gen, batch=2)
    calls = []

    def counted(z, *p):
        calls.append(1)
        return tanh_cell(z, *p)

    with torch.no_grad():
        z, info = deqdiff.fixed_point(counted, z0, *params, tol=1e-6, grad="phantom", return_info=True)
    n = len(calls)
    calls.clear()
    with torch.no_grad():
        deqdiff.fixed_point(counted, z0, *params, tol=1e-6, return_info=True)
    assert n == len(calls)


def test_invalid_modes_are_refused(gen):
    z0, params = make_problem(gen)
    with pytest.raises(ValueError, match="steps must be an integer"):
        PhantomGrad(steps=0)
    with pytest.raises(ValueError, match="damping must be in"):
        PhantomGrad(damping=0.0)
    with pytest.raises(ValueError, match="grad must be one of"):
        deqdiff.fixed_point(tanh_cell, z0, *params, grad="unrolled")


def test_deq_layer_option_runs_no_derivative_solve():
    torch.manual_seed(0)

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            with torch.no_grad():
                self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, 2))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    cell = Cell()
    x = torch.randn(3, 5)
    phantom = deqdiff.DEQ(cell, tol=1e-12, grad=PhantomGrad(steps=60, damping=0.9))
    exact = deqdiff.DEQ(cell, tol=1e-12)
    g_ph = torch.autograd.grad(phantom(x).pow(2).sum(), list(cell.parameters()))
    assert phantom.last_info.derivatives == []
    g_ex = torch.autograd.grad(exact(x).pow(2).sum(), list(cell.parameters()))
    assert exact.last_info.derivatives
    for a, r in zip(g_ph, g_ex):
        assert rel_err(a, r) < 1e-9
