"""Burgers and the heat equation written in the PDE interface (:mod:`.pde`), the same problems
as :mod:`.burgers` (which keeps its hand-written derivative code and CLI):

    u_t + c·u·u_x = ν u_xx,  x ∈ [−1, 1], t ∈ [0, 1],  u(x, 0) = −sin(πx),  u(±1, t) = 0,

``c = 1`` (Burgers; Raissi, Perdikaris & Karniadakis 2019, sec. 3.1.1, with the Cole–Hopf
reference of Basdevant et al. 1986) or ``c = 0`` (heat, analytic ``−sin(πx) e^{−νπ²t}``).
"""

from __future__ import annotations

import math

import torch

from .burgers import reference_solution
from .pde import Box, Dirichlet, Initial, PDEProblem, Uniform

__all__ = ["burgers_problem", "heat_problem"]


def burgers_problem(nu: float = 0.1 / math.pi, convection: float = 1.0, *, T: float = 1.0, n_collocation: int = 1000,
                    n_initial: int = 200, n_boundary: int = 200) -> PDEProblem:
    """``u_t + c u u_x − ν u_xx = 0`` with the reference of :func:`.burgers.reference_solution`."""
    return PDEProblem(
        domain=Box({"x": (-1.0, 1.0), "t": (0.0, T)}),
        residual=lambda d: d.u_t + convection * d.u * d.u_x - nu * d.u_xx,
        conditions=[Initial(lambda p: -torch.sin(math.pi * p.x), n=n_initial), Dirichlet("x", 0.0, n=n_boundary)],
        collocation=Uniform(n_collocation),
        reference=lambda X: reference_solution(X[:, 0], X[:, 1], nu, convection),
        name="burgers" if convection else "heat")


def heat_problem(nu: float = 0.1 / math.pi, **kwargs) -> PDEProblem:
    """``u_t = ν u_xx`` (Burgers without convection), analytic reference."""
    return burgers_problem(nu, 0.0, **kwargs)
