"""Reference problems for deqdiff.derivatives: a strongly contractive time-dependent cell
f(z; A, U, a, b, x, t) = tanh(A z + U x + a t + b) with ‖A‖₂ ≤ 0.5 (float64)."""

from __future__ import annotations

import torch

import deqdiff
from tests.conftest import contractive_matrix, unrolled

TIGHT = dict(tol=1e-13, max_iter=500)


def time_cell(z, A, U, a, b, x, t):
    """tanh(A z + U x + a t + b); t is a scalar or per-sample (shape ``batch``)."""
    t = torch.as_tensor(t)
    return torch.tanh(z @ A.T + x @ U.T + t[..., None] * a + b)


def make_time_problem(gen, n=4, m=3, batch=None, rho=0.45):
    A = contractive_matrix(n, rho, gen)
    U = torch.randn(n, m, generator=gen) / m**0.5
    a = torch.randn(n, generator=gen)
    b = 0.1 * torch.randn(n, generator=gen)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, m, generator=gen)
    t = 0.3 * torch.randn(shape, generator=gen)
    z0 = torch.zeros(*shape, n)
    return z0, (A, U, a, b, x, t)


def solve(f, z0, params, batch_ndim=0):
    return deqdiff.fixed_point(f, z0, *params, batch_ndim=batch_ndim, **TIGHT)


def unrolled_fn(f, z0, iters=300):
    """params ↦ z* by 300 unrolled iterations (the autodiff reference)."""
    return lambda *p: unrolled(f, z0, *p, iters=iters)


class SolveCounter:
    """Counts calls of the engine's linear solve made by deqdiff.derivatives (a vmapped
    call with many right-hand sides counts once)."""

    def __init__(self, monkeypatch):
        import deqdiff.derivatives._problem as prob

        self.calls = 0
        inner = prob.solve_with_operator

        def counted(op, b, params):
            self.calls += 1
            return inner(op, b, params)

        monkeypatch.setattr(prob, "solve_with_operator", counted)
