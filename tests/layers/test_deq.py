"""``DEQ`` module: parameters enter explicitly, so every derivative w.r.t. them is exact."""

from __future__ import annotations

import torch
from torch import nn

import deqdiff
from tests.conftest import rel_err


class Cell(nn.Module):
    def __init__(self, n=6, d=3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(d, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, z, x):
        return torch.tanh(self.scale * self.lin(z) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.in_features)


def unrolled(cell, x, iters=300):
    z = cell.init_state(x)
    for _ in range(iters):
        z = cell(z, x)
    return z


def test_module_parameter_derivatives_to_second_order():
    torch.manual_seed(0)
    cell = Cell()
    deq = deqdiff.DEQ(cell, tol=1e-12, max_iter=300)
    x = torch.randn(5, 3, requires_grad=True)

    def pinn_like(model):
        z = model(x)
        (dx,) = torch.autograd.grad(z[:, 0].sum(), x, create_graph=True)
        return torch.autograd.grad((dx**2).sum() + (z**2).sum(), list(cell.parameters()))

    for a, r in zip(pinn_like(deq), pinn_like(lambda x: unrolled(cell, x))):
        assert rel_err(a, r) < 1e-9
    assert deq.last_info.forward.all_converged
    assert len(deq.last_info.derivatives) >= 2


def test_module_backward_accumulates_into_parameter_grads():
    torch.manual_seed(1)
    cell = Cell()
    deq = deqdiff.DEQ(cell, tol=1e-12)
    x = torch.randn(4, 3)
    deq(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    unrolled(cell, x).pow(2).sum().backward()
    for a, p in zip(got, cell.parameters()):
        assert rel_err(a, p.grad) < 1e-9


def test_tied_weights_get_the_gradient_of_every_use():
    """A cell that uses one weight under two names (weight tying): the implicit gradient
    equals unrolled autodiff through a strongly contractive map, so both uses are counted."""
    class TiedCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            with torch.no_grad():
                self.a.weight.mul_(0.3)

        def forward(self, z, x):
            return torch.tanh(self.a(z) + 0.5 * self.b(x))

    torch.manual_seed(0)
    cell = TiedCell()
    x = torch.randn(3, 4)
    deqdiff.DEQ(cell, tol=1e-12).forward(x).sum().backward()
    implicit = cell.a.weight.grad.clone()
    cell.zero_grad()
    z = torch.zeros(3, 4)
    for _ in range(200):
        z = cell(z, x)
    z.sum().backward()
    torch.testing.assert_close(implicit, cell.a.weight.grad, rtol=1e-9, atol=1e-10)
