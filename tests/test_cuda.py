"""The engine on a CUDA device (skipped where there is none; CI has none)."""

from __future__ import annotations

import pytest
import torch

import deqdiff
from tests.conftest import contractive_matrix, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def f(z, A, x):
    return torch.tanh(z @ A.T + x)


@pytest.mark.parametrize("dtype,tol,bound", [(torch.float64, 1e-12, 1e-8), (torch.float32, 1e-6, 1e-3)])
@pytest.mark.parametrize("backward_solver", ["dense", "gmres"])
def test_second_order_on_cuda_matches_cpu(dtype, tol, bound, backward_solver):
    g = torch.Generator().manual_seed(0)
    A_cpu = contractive_matrix(16, 0.7, g).to(dtype)
    x_cpu = torch.randn(64, 16, generator=g).to(dtype)

    def pinn(A, x):
        A = A.clone().requires_grad_()
        x = x.clone().requires_grad_()
        z = deqdiff.fixed_point(f, torch.zeros_like(x), A, x, tol=tol, batch_ndim=1, backward_solver=backward_solver)
        (dx,) = torch.autograd.grad(z.sum(), x, create_graph=True)
        return torch.autograd.grad((dx**2).sum(), A)[0]

    got = pinn(A_cpu.cuda(), x_cpu.cuda()).cpu()
    ref = pinn(A_cpu.double(), x_cpu.double()).to(dtype)
    assert rel_err(got.double(), ref.double()) < bound
