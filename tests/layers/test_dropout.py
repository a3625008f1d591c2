"""Variational dropout: one mask per forward solve, exact derivatives for that mask, off in eval."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import deqdiff
from deqdiff.layers import VariationalDropout
from tests.conftest import rel_err


class DropCell(nn.Module):
    """tanh(W · drop(z) + U x + b); records the mask seen at every call."""

    def __init__(self, n=6, d=3, p=0.3, shared_dims=()):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(d, n)
        self.drop = VariationalDropout(p, shared_dims=shared_dims)
        with torch.no_grad():  # contraction ≤ 0.4 / (1 − p) < 1 whatever the mask
            self.lin.weight.mul_(0.4 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.seen: list[torch.Tensor] = []

    def forward(self, z, x):
        if self.drop.training and self.drop.mask is not None:
            self.seen.append(self.drop.mask.detach().clone())
        return torch.tanh(self.lin(self.drop(z)) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.in_features)


def masked_reference(cell: DropCell, mask: torch.Tensor, x: torch.Tensor, iters: int = 300) -> torch.Tensor:
    """Unrolled autodiff through the map with the mask as a constant (exact on contractions)."""
    z = cell.init_state(x)
    for _ in range(iters):
        z = torch.tanh(cell.lin(z * mask) + cell.inj(x))
    return z


def test_invalid_p_and_eval_identity():
    with pytest.raises(ValueError, match="p must be in"):
        VariationalDropout(1.0)
    drop = VariationalDropout(0.5).eval()
    x = torch.randn(4, 3)
    assert torch.equal(drop(x), x)
    assert drop.mask is None


def test_mask_is_kept_until_reset_and_scaled():
    torch.manual_seed(0)
    drop = VariationalDropout(0.25)
    x = torch.randn(200, 8)
    y1, y2 = drop(x), drop(x)
    assert torch.equal(y1, y2)
    vals = set(drop.mask.unique().tolist())
    assert vals <= {0.0, 1 / 0.75} and len(vals) == 2
    drop.reset_mask()
    assert not torch.equal(drop(x), y1)


def test_shared_dims_mask_shape():
    drop = VariationalDropout(0.5, shared_dims=(2, 3))
    drop(torch.randn(2, 4, 5, 5))
    assert drop.mask.shape == (2, 4, 1, 1)
    assert "mask" not in drop.state_dict()  # a mask is per solve, not model state


def test_one_mask_per_solve_and_new_mask_per_solve():
    torch.manual_seed(1)
    cell = DropCell()
    deq = deqdiff.DEQ(cell, tol=1e-10, max_iter=200, row_params=False)  # every call sees every row
    x = torch.randn(5, 3)
    deq(x)
    first = cell.seen
    assert len(first) > 5 and all(torch.equal(m, first[0]) for m in first)
    cell.seen = []
    deq(x)
    assert all(torch.equal(m, cell.seen[0]) for m in cell.seen)
    assert not torch.equal(cell.seen[0], first[0])


def test_derivatives_exact_for_the_solve_mask_even_after_a_later_solve():
    torch.manual_seed(2)
    cell = DropCell(p=0.4)
    deq = deqdiff.DEQ(cell, tol=1e-12, max_iter=300)
    x = torch.randn(4, 3, requires_grad=True)
    z = deq(x)
    mask = cell.drop.mask
    deq(x)  # a second solve draws a new mask; z's derivative solves must keep the first
    assert not torch.equal(cell.drop.mask, mask)
    params = list(cell.parameters())

    def second_order(out):
        (dx,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        return torch.autograd.grad((dx**2).sum() + (out**2).sum(), [x, *params])

    for a, r in zip(second_order(z), second_order(masked_reference(cell, mask, x, iters=120))):
        assert rel_err(a, r) < 1e-9


def test_gradcheck_with_the_mask_fixed_by_the_seed():
    cell = DropCell(n=3, d=2, p=0.3)
    deq = deqdiff.DEQ(cell, tol=1e-13, max_iter=400)
    x = torch.randn(2, 2, requires_grad=True)
    w = cell.lin.weight.detach().clone().requires_grad_()

    def fn(x, w):
        torch.manual_seed(7)  # the same mask at every evaluation: a deterministic map of (x, w)
        return functional_call(deq, {"cell.lin.weight": w}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w), atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-6)


def test_per_sample_masks_follow_row_subsets():
    # samples converge at different speeds, so the solver drops finished rows: the mask rows must follow
    torch.manual_seed(3)
    cell = DropCell(n=5, d=3, p=0.3)
    deq = deqdiff.DEQ(cell, solver="fixed_point", tol=1e-11, max_iter=500)
    x = torch.randn(8, 3)
    x[:4] *= 0.01
    z = deq(x)
    ref = masked_reference(cell, cell.drop.mask, x, iters=500)
    assert rel_err(z, ref) < 1e-9


def test_eval_mode_is_deterministic_and_maskless():
    cell = DropCell().eval()
    deq = deqdiff.DEQ(cell, tol=1e-10)
    x = torch.randn(3, 3)
    assert torch.equal(deq(x), deq(x))
    assert cell.drop.mask is None
