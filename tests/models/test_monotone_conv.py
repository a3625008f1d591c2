"""Convolutional monotone DEQ (models/monotone_conv.py): parametrization, engine integration,
Lipschitz bounds, the model protocol. The Fourier structure is tested in tests/solvers/test_splitting.py."""

from __future__ import annotations

import pytest
import torch

from deqdiff.models import MonotoneConvDEQ

torch.set_default_dtype(torch.float64)


def test_conv_I_minus_W_is_m_strongly_monotone():
    torch.manual_seed(0)
    model = MonotoneConvDEQ(1, 3, (4, 5), 2, m=0.07, pool=1)
    with torch.no_grad():
        model.cell.A.weight.mul_(4.0)
        model.cell.B.weight.mul_(6.0)
    N = 3 * 4 * 5
    basis = torch.eye(N).reshape(N, 3, 4, 5)
    W = model.cell.multiply(basis).reshape(N, N).T.detach()
    eig = torch.linalg.eigvalsh(torch.eye(N) - 0.5 * (W + W.T))
    assert float(eig.min()) >= 0.07 - 1e-9


def test_conv_gradcheck_with_splitting_both_ways():
    torch.manual_seed(3)
    model = MonotoneConvDEQ(1, 2, 3, 2, m=0.5, tol=1e-11, max_iter=2000, on_fail="raise",
                            backward_solver="pr", backward_tol=1e-11, pool=3)
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: model(x), (x,))
    # parameter gradients (PR adjoint splitting) equal the dense adjoint's
    grads = []
    for backward in ("pr", "dense"):
        loss = model(x.detach(), backward_solver=backward).square().sum()
        grads.append(torch.autograd.grad(loss, (model.cell.A.weight, model.cell.B.weight, model.cell.U.weight)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)


def test_conv_lipschitz_bounds_hold():
    torch.manual_seed(6)
    model = MonotoneConvDEQ(1, 4, 6, 2, m=0.2, tol=1e-10, max_iter=3000, on_fail="raise")
    x = torch.randn(6, 1, 6, 6)
    x2 = x + 0.3 * torch.randn_like(x)
    with torch.no_grad():
        z, z2 = model.equilibrium(x), model.equilibrium(x2)
    assert torch.all(z.flatten(1).norm(dim=1) <= model.cell.state_norm_bound(x) * (1 + 1e-9))
    lip = model.cell.lipschitz_bound()
    assert torch.all((z - z2).flatten(1).norm(dim=1) <= lip * (x - x2).flatten(1).norm(dim=1) * (1 + 1e-9))


def test_conv_model_protocol():
    torch.manual_seed(8)
    model = MonotoneConvDEQ(1, 8, 8, 10)
    x = torch.rand(3, 64)
    assert model(x).shape == (3, 10)
    assert model.deq.last_info.forward.all_converged
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.rand(3, 2, 8, 8))
    with pytest.raises(ValueError, match="pool"):
        MonotoneConvDEQ(1, 4, 7, 10, pool=2)
