"""Fixed-point (Picard) iteration with damping: z ← (1 − β) z + β g(z)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, register_solver, row_norm


@register_solver("fixed_point")
def fixed_point_iteration(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
    damping: float = 1.0,
) -> tuple[Tensor, SolveInfo]:
    """Damped Picard iteration on ``(S, N)`` states; ``damping`` = β ∈ (0, 1]."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    track = Tracker(z0, tol, atol, store_trajectory)
    z = z0
    running = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    for k in range(max_iter + 1):
        gz = g(z)
        running = track.update(k, z, row_norm(gz - z), row_norm(gz) if scale is None else scale)
        if track.finished or k == max_iter:
            break
        z = torch.where(running[:, None], z + damping * (gz - z), z)
    return track.result, track.info("fixed_point", "forward", damping=damping)
