"""Fixed-point correction: losses on solver iterates, differentiated with the DEQ's backward mode,
against hand-built references (phantom: unrolled damped steps; exact: dense implicit rule at z_k)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqdiff
from deqdiff.training.correction import GivenIterate, check_correction, correction_outputs, correction_weights
from tests.conftest import rel_err


class Cell(nn.Module):
    def __init__(self, n=4, d=3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(d, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.in_features)


class Net(nn.Module):
    def __init__(self, grad):
        super().__init__()
        self.deq = deqdiff.DEQ(Cell(), solver="fixed_point", tol=1e-12, max_iter=300, grad=grad)
        self.head = nn.Linear(4, 2)

    def forward(self, x, **overrides):
        return self.head(self.deq(x, **overrides))


ITERS, WEIGHTS = [2, 5], [0.3, 0.7]


def _loss(out):
    return (out**2).sum() + out[:, 0].sum()


def _correction_grads(net, x):
    out, outs = correction_outputs(net, x, ITERS)
    total = _loss(out) + sum(w * _loss(o) for w, o in zip(WEIGHTS, outs))
    return out, outs, torch.autograd.grad(total, list(net.parameters()))


def _picard(cell, x, k):
    z = cell.init_state(x)
    with torch.no_grad():
        for _ in range(k):
            z = cell(z, x)
    return z


def test_phantom_correction_equals_unrolled_damped_steps_from_each_iterate():
    torch.manual_seed(0)
    mode = deqdiff.PhantomGrad(steps=3, damping=0.6)
    net = Net(mode)
    x = torch.randn(5, 3)
    out, outs, got = _correction_grads(net, x)
    cell = net.deq.cell

    def phantom_from(z):
        for _ in range(3):
            z = 0.4 * z + 0.6 * cell(z, x)
        return net.head(z)

    ref_final = phantom_from(_picard(cell, x, 300))
    ref_outs = [phantom_from(_picard(cell, x, k)) for k in ITERS]
    for a, r in zip([out, *outs], [ref_final, *ref_outs]):
        assert rel_err(a, r) < 1e-12
    total = _loss(ref_final) + sum(w * _loss(o) for w, o in zip(WEIGHTS, ref_outs))
    for a, r in zip(got, torch.autograd.grad(total, list(net.parameters()))):
        assert rel_err(a, r) < 1e-10


def test_exact_correction_is_the_implicit_rule_at_each_iterate():
    torch.manual_seed(1)
    net = Net("exact")
    x = torch.randn(3, 3)
    out, outs, got = _correction_grads(net, x)
    cell, head = net.deq.cell, net.head
    params = list(net.parameters())
    cell_params = list(cell.parameters())

    def implicit_grads(z):
        # dense float64: w = (I − J)⁻ᵀ ∂ℓ/∂z at z (the whole batch as one system), θ̄ = (∂f/∂θ)ᵀ w + head terms
        z = z.detach().requires_grad_()
        out = head(z)
        loss = _loss(out)
        gz, *g_head = torch.autograd.grad(loss, [z, *head.parameters()])
        J = torch.autograd.functional.jacobian(lambda v: cell(v.reshape(z.shape), x).reshape(-1), z.reshape(-1))
        w = torch.linalg.solve((torch.eye(J.shape[0]) - J).T, gz.reshape(-1))
        g_cell = torch.autograd.grad(cell(z, x), cell_params, w.reshape(z.shape))
        return out, [*g_cell, *g_head]

    ref_out, ref = implicit_grads(_picard(cell, x, 300))
    assert rel_err(out, ref_out) < 1e-10
    for k, w, o in zip(ITERS, WEIGHTS, outs):
        o_ref, g = implicit_grads(_picard(cell, x, k))
        assert rel_err(o, o_ref) < 1e-12  # the value is the iterate's, not the fixed point's
        ref = [a + w * b for a, b in zip(ref, g)]
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-8
    assert len(params) == len(got)
    assert net.deq.last_info.forward.solver == "fixed_point"  # the main solve's statistics are kept


def test_iterations_past_convergence_take_the_final_state():
    torch.manual_seed(2)
    net = Net("exact")
    x = torch.randn(2, 3)
    out, (late,) = correction_outputs(net, x, [10_000])
    assert rel_err(late, out) < 1e-12


def test_given_iterate_reports_its_residual_and_checks_shapes():
    z = torch.zeros(2, 3)
    solver = GivenIterate(z)
    _, info = solver(lambda v: v + 1.0, torch.zeros(2, 3), tol=1e-6)
    assert not info.all_converged and torch.allclose(info.residual, torch.full((2,), 3.0**0.5))
    with pytest.raises(ValueError, match="stored state has shape"):
        solver(lambda v: v, torch.zeros(3, 3), tol=1e-6)


def test_checks_and_default_weights():
    assert correction_weights(3) == pytest.approx([0.8**3, 0.8**2, 0.8])
    assert check_correction([3, 6], None)[1] == pytest.approx([0.64, 0.8])
    for its, ws, msg in (([0], None, ">= 1"), ([4, 2], None, "increasing"), ([1, 2], [1.0], "2 iterations"),
                         ([1], [-1.0], ">= 0")):
        with pytest.raises(ValueError, match=msg):
            check_correction(its, ws)
