"""Weight and spectral normalization of DEQ cells: against PyTorch's parametrizations, one
operator per solve, exact derivatives to second order."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import deqdiff
from deqdiff.layers import SpectralNorm, apply_spectral_norm, apply_weight_norm, spectral_norm
from deqdiff.layers.normalization import WeightNorm, weight_norm
from tests.conftest import rel_err


class Cell(nn.Module):
    def __init__(self, n=5, d=3):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.inj = nn.Linear(d, n)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.lin.in_features)


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 4), lambda: nn.Conv2d(3, 5, 3), lambda: nn.ConvTranspose2d(3, 5, 3)])
def test_spectral_norm_matches_pytorch_step_by_step(make):
    torch.manual_seed(0)
    ref, ours = make(), make()
    ours.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    parametrizations.spectral_norm(ref)
    torch.manual_seed(1)
    spectral_norm(ours)  # same draws, same 15 initial steps
    # PyTorch's registration reads the weight once in training mode: one more power step
    ours.parametrizations.weight[0].update(ours.parametrizations.weight.original)
    for step in range(4):
        # PyTorch iterates when the weight is read in training mode; ours when update() is called
        w_ref = ref.weight
        ours.parametrizations.weight[0].update(ours.parametrizations.weight.original)
        assert rel_err(ours.weight, w_ref) < 1e-12
        with torch.no_grad():  # an optimizer step on the raw weights
            delta = 0.1 * torch.randn_like(ref.parametrizations.weight.original)
            ref.parametrizations.weight.original.add_(delta)
            ours.parametrizations.weight.original.add_(delta)
    ref.eval()
    assert rel_err(ours.weight, ref.weight) < 1e-12  # reading never iterates (eval for PyTorch)
    assert rel_err(ours.weight, ours.weight) == 0.0
    ours.parametrizations.weight[0].update(ours.parametrizations.weight.original, 200)  # σ estimate converged
    w = ours.weight.detach()
    mat = w.movedim(1, 0).flatten(1) if isinstance(ours, nn.ConvTranspose2d) else w.flatten(1)
    assert float(torch.linalg.matrix_norm(mat, 2)) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 4), lambda: nn.Conv2d(2, 3, 3)])
def test_weight_norm_matches_pytorch_and_has_exact_second_derivatives(make):
    torch.manual_seed(0)
    ours, ref = make(), make()
    ref.load_state_dict(ours.state_dict())
    weight_norm(ours)
    parametrizations.weight_norm(ref)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert torch.allclose(ours.weight, ref.weight, rtol=1e-14, atol=0)
    x = torch.randn(2, *((5,) if isinstance(ours, nn.Linear) else (2, 6, 6)))
    g_ours = torch.autograd.grad(ours(x).pow(2).sum(), list(ours.parameters()))
    g_ref = torch.autograd.grad(ref(x).pow(2).sum(), list(ref.parameters()))
    for a, r in zip(g_ours, g_ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-14)
    wn = WeightNorm(0)
    g, v = (t.detach().clone().requires_grad_() for t in wn.right_inverse(torch.randn(4, 3, 2)))
    assert torch.autograd.gradgradcheck(wn, (g, v))


def test_apply_weight_norm_to_a_cell():
    cell = Cell()
    w = cell.lin.weight.detach().clone()
    apply_weight_norm(cell)
    assert torch.allclose(cell.lin.weight, w)
    assert isinstance(cell.inj.parametrizations.weight[0], WeightNorm)
    with pytest.raises(ValueError, match="no un-normalized weight"):
        apply_weight_norm(cell)


def _second_order(out, x, params):
    # second derivatives in x and in the parameters (differentiating a parameter gradient)
    (dx,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
    first = torch.autograd.grad((out**2).sum(), params, create_graph=True)
    return torch.autograd.grad((dx**2).sum() + sum((g**2).sum() for g in first), params)


def _unrolled(cell, x, iters=300):
    z = cell.init_state(x)
    for _ in range(iters):
        z = cell(z, x)
    return z


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_normalized_cell_second_derivatives_are_exact(norm):
    torch.manual_seed(2)
    cell = Cell()
    if norm == "weight":
        apply_weight_norm(cell)
        with torch.no_grad():  # contraction: ‖W‖ = 0.5
            cell.lin.parametrizations.weight.original0.mul_(0.5 / torch.linalg.matrix_norm(cell.lin.weight, 2))
    else:
        apply_spectral_norm(cell, coeff=0.5, n_power_iterations=3)
    deq = deqdiff.DEQ(cell, tol=1e-12, max_iter=300)
    x = torch.randn(4, 3, requires_grad=True)
    params = list(cell.parameters())
    got = _second_order(deq(x), x, params)
    cell.eval()  # the reference reads the same (u, v): no update
    for a, r in zip(got, _second_order(_unrolled(cell, x), x, params)):
        assert rel_err(a, r) < 1e-9


def test_power_iteration_runs_once_per_solve_never_inside():
    torch.manual_seed(3)
    cell = Cell()
    apply_spectral_norm(cell, coeff=0.5)
    sn: SpectralNorm = cell.lin.parametrizations.weight[0]
    seen = []  # storage of the u each cell evaluation reads (the engine may hand in detached aliases)
    cell.register_forward_pre_hook(lambda m, args: seen.append(sn._u.data_ptr()))
    deq = deqdiff.DEQ(cell, tol=1e-10)
    x = torch.randn(3, 3)
    u0 = sn._u
    z = deq(x)
    assert len(seen) > 3 and all(u == seen[0] for u in seen) and seen[0] != u0.data_ptr()
    u1 = sn._u
    assert seen[0] == u1.data_ptr()
    z.sum().backward()  # derivative solves: same (u, v)
    assert sn._u is u1 and all(u == seen[0] for u in seen)
    deq(x, refresh=False)
    assert sn._u is u1
    deq.eval()
    deq(x)
    assert sn._u is u1
    deq.train()
    deq(x)
    assert sn._u is not u1
    assert "lin.parametrizations.weight.0._u" in cell.state_dict()  # checkpoints keep (u, v)
