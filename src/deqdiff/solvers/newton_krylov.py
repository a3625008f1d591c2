"""Inexact Newton–Krylov method for z = g(z).

Newton's method on F(z) = g(z) − z: each step solves

    (I − J_g(z_k)) δ = g(z_k) − z_k,   z_{k+1} = z_k + δ,

approximately with restarted GMRES (:func:`deqdiff.solvers.gmres.gmres`) to the
relative inner tolerance η (constant forcing term: ‖F_k + J_F δ‖ ≤ η‖F_k‖, so near the
solution the residual contracts roughly by η per step). Products J_g(z) v come from
``torch.func.jvp(g, (z,), (v,))``, so the Jacobian is never formed. There is no line
search; the method is meant for problems where Newton converges from the initial guess
(e.g. contractive g). Converged rows get a zero right-hand side, which GMRES returns
immediately, so they are frozen.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, register_solver, row_norm
from .gmres import gmres


class _NewtonOperator:
    """v ↦ (I − J_g(z)) v row-wise, via forward-mode AD."""

    def __init__(self, g: Callable[[Tensor], Tensor], z: Tensor):
        self.g, self.z = g, z

    def mv(self, v: Tensor) -> Tensor:
        return v - torch.func.jvp(self.g, (self.z,), (v,))[1]


@register_solver("newton_krylov")
def newton_krylov(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 30,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
    eta: float = 1e-2,
    inner_max_iter: int = 100,
    restart: int = 20,
) -> tuple[Tensor, SolveInfo]:
    """Newton steps (``max_iter`` counts them) with GMRES(``restart``) inner solves to
    relative tolerance ``eta`` ∈ (0, 1) in at most ``inner_max_iter`` ≥ 1 matvecs.
    ``extra["inner_matvecs"]`` is the total number of Jacobian-vector products."""
    if not 0.0 < eta < 1.0:
        raise ValueError(f"newton_krylov forcing term eta must be in (0, 1), got {eta}")
    if int(inner_max_iter) != inner_max_iter or inner_max_iter < 1:
        raise ValueError(f"newton_krylov inner_max_iter must be an integer >= 1, got {inner_max_iter}")
    if int(restart) != restart or restart < 1:
        raise ValueError(f"newton_krylov restart must be an integer >= 1, got {restart}")
    track = Tracker(z0, tol, atol, store_trajectory)
    z = z0
    inner = 0
    for k in range(max_iter + 1):
        gz = g(z)
        F = gz - z
        running = track.update(k, z, row_norm(F), row_norm(gz) if scale is None else scale)
        if track.finished or k == max_iter:
            break
        rhs = torch.where(running[:, None], F, 0.0)
        delta, info = gmres(_NewtonOperator(g, z), rhs, None, tol=eta, max_iter=inner_max_iter, restart=restart)
        inner += info.extra["matvecs"]
        z = torch.where(running[:, None], z + delta, z)
    return track.result, track.info(
        "newton_krylov", "forward", eta=eta, inner_max_iter=inner_max_iter, restart=restart, inner_matvecs=inner
    )
