"""Solvers follow the device and dtype of their inputs (CUDA cases are marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from deqdiff.solvers import get_solver
from solver_problems import FORWARD, LINEAR, DenseOp, gen, make_map, with_norm

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def _data(dtype, device, S=3, N=10):
    g_ = gen(0)
    A = with_norm(S, N, [0.2, 0.5, 0.8], g_)
    c = torch.randn(S, N, generator=g_, dtype=torch.float64)
    return A.to(device, dtype), c.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_on_device(device, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    A, c = _data(dtype, device)
    reference = None
    for name in FORWARD:
        z, info = get_solver(name)(make_map("tanh", A, c), torch.zeros_like(c), tol=tol, max_iter=300)
        assert z.device.type == device and z.dtype == dtype and info.residual.device.type == device
        assert info.all_converged, info.summary()
        reference = z if reference is None else reference
        torch.testing.assert_close(z, reference, atol=20 * tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_on_device(device, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    A, b = _data(dtype, device)
    A = torch.eye(A.shape[1], dtype=dtype, device=device) - A
    x_ref = torch.linalg.solve(A, b)
    for name in LINEAR:
        x, info = get_solver(name, "linear")(DenseOp(A), b, None, tol=tol, max_iter=300)
        assert x.device.type == device and x.dtype == dtype
        assert info.all_converged, (name, info.summary())
        torch.testing.assert_close(x, x_ref, atol=50 * tol, rtol=0)
