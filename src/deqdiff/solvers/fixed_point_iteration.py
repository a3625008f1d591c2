"""Fixed-point (Picard) iteration with damping: z ← (1 − β) z + β g(z)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import SolveInfo, Tracker, compact_now, compaction, register_solver, row_norm, static_rows


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
    """Damped Picard iteration on ``(S, N)`` states; ``damping`` = β ∈ (0, 1].

    When ``g`` can evaluate a subset of rows (:func:`compaction`), the iteration runs on
    the rows still running only."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    track = Tracker(z0, tol, atol, store_trajectory, static=static_rows(g))
    compact = compaction(g)
    z, rows = z0, None  # rows: indices of the rows z holds (None: all)
    for k in range(max_iter + 1):
        gz = g(z) if rows is None else g(z, rows=rows)
        F = gz - z
        sc = row_norm(gz) if scale is None else (scale if rows is None else scale[rows])
        running = track.update(k, z, track.residual_norm(F, rows), sc, rows)
        if track.finished or k == max_iter:
            break
        z = gz if damping == 1.0 else z + damping * F
        del F
        if compact and compact_now(g, k, running):
            keep = running.nonzero().squeeze(1)
            z = z[keep]
            rows = keep if rows is None else rows[keep]
    return track.result, track.info("fixed_point", "forward", damping=damping)
