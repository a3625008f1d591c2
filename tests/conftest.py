"""Shared reference problems: small contractive maps in float64 with exact references."""

from __future__ import annotations

import pytest
import torch

torch.set_default_dtype(torch.float64)


def contractive_matrix(n: int, rho: float, generator: torch.Generator) -> torch.Tensor:
    """A random n×n matrix with spectral norm ``rho`` (so tanh(A z + …) contracts by ρ)."""
    A = torch.randn(n, n, generator=generator)
    return rho * A / torch.linalg.matrix_norm(A, 2)


def tanh_cell(z, A, B, x, b):
    """f(z; A, B, x, b) = tanh(A z + B x + b), batched over leading dims of z and x."""
    return torch.tanh(z @ A.T + x @ B.T + b)


def unrolled(f, z0, *params, iters: int = 300):
    """Reference: autodiff through plain iteration (exact on strongly contractive maps)."""
    z = z0
    for _ in range(iters):
        z = f(z, *params)
    return z


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def make_problem(gen, n=5, m=3, batch=None, rho=0.4):
    A = contractive_matrix(n, rho, gen).requires_grad_()
    B = torch.randn(n, m, generator=gen).requires_grad_()
    shape = (m,) if batch is None else (batch, m)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    b = (0.1 * torch.randn(n, generator=gen)).requires_grad_()
    z0 = torch.zeros(*shape[:-1], n)
    return z0, (A, B, x, b)


def track_linearizations(monkeypatch) -> list:
    """Weak references to every linearization of a fixed point built from now on (the engine's
    ``_linearize_fixed_point`` wrapped for the test), to check which are still held."""
    import weakref

    import deqdiff.engine.operators as operators

    lins: list = []
    original = operators._linearize_fixed_point

    def linearize(*args, **kw):
        lin = original(*args, **kw)
        lins.append(weakref.ref(lin))
        return lin

    monkeypatch.setattr(operators, "_linearize_fixed_point", linearize)
    return lins
