"""2-D Poisson equation on the unit square with an analytic solution (second derivatives in
two dimensions):

    −Δu = 2π² sin(πx) sin(πy)  in (0, 1)²,   u = 0 on the boundary,

whose solution is ``u = sin(πx) sin(πy)`` (the standard PINN benchmark, e.g. Lu, Meng, Mao &
Karniadakis 2021, "DeepXDE", sec. 4). The residual reads ``u_xx`` and ``u_yy``: four implicit
forward-mode solves per step for a DEQ (``z_x``, ``z_y``, ``z_xx``, ``z_yy``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .pde import Box, Dirichlet, PDEProblem, Uniform

__all__ = ["poisson2d", "exact"]


def exact(X: np.ndarray) -> np.ndarray:
    """``u(x, y) = sin(πx) sin(πy)`` at the points ``X`` ``(N, 2)``."""
    return np.sin(np.pi * X[:, 0]) * np.sin(np.pi * X[:, 1])


def poisson2d(n_collocation: int = 1000, n_boundary: int = 200, collocation=None) -> PDEProblem:
    """The problem above: ``n_collocation`` interior points a step (or the given sampler) and
    ``n_boundary`` points on the x-faces and on the y-faces each."""
    source = lambda d: 2 * math.pi ** 2 * torch.sin(math.pi * d.x) * torch.sin(math.pi * d.y)  # noqa: E731
    return PDEProblem(
        domain=Box({"x": (0.0, 1.0), "y": (0.0, 1.0)}),
        residual=lambda d: -(d.u_xx + d.u_yy) - source(d),
        conditions=[Dirichlet("x", 0.0, n=n_boundary), Dirichlet("y", 0.0, n=n_boundary)],
        collocation=collocation or Uniform(n_collocation),
        reference=exact, name="poisson2d")
