"""Exact power-of-two rescaling that makes every solve scale-invariant.

A problem multiplied by a scale c — the fixed point z = g(z) as z̃ = c·g(z̃/c), the linear
system A x = b as A x̃ = c·b — has the same relative answer, but a solver's inner products
(Anderson's Gram matrix ΔFᵀΔF, Krylov dot products, squared norms) underflow to 0 or
overflow to ∞ once c leaves a band around 1: float32 problems of size 1e-24 then came back as
exact zeros reported converged. Rows whose magnitude lies outside the band
``[√(tiny/ε)/ε, √max·ε]`` of their dtype are therefore solved at scale 1 and scaled back:
by a power of two per row, so the rescaling itself is exact and rows inside the band run
bit for bit as before. Every forward solver that sees the map only through ``g`` (Picard,
Anderson, Broyden, Newton–Krylov) and every linear solver (linear in ``b``) is equivariant
under this change of variables, so the answer is the same, only representable.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .base import SolveInfo, _extremes, row_norm

__all__ = ["row_scales", "solve_forward_rescaled", "solve_linear_rescaled"]


def _band(dtype: torch.dtype) -> tuple[float, float]:
    fi = torch.finfo(dtype)
    return math.sqrt(fi.tiny / fi.eps) / fi.eps, math.sqrt(fi.max) * fi.eps


def row_scales(magnitude: Tensor) -> Tensor | None:
    """Per-row powers of two ``s`` with ``magnitude/s ≈ 1`` for rows outside the safe band
    (``s = 1`` inside it and for rows of magnitude 0 or non-finite); ``None`` when every row is
    inside, the common case, which then costs nothing more."""
    lo, hi = _band(magnitude.dtype)
    # the common case in one reduction: every magnitude inside the band, or exactly 0
    least, most = _extremes(magnitude.masked_fill(magnitude == 0, 1.0))
    if least >= lo and most <= hi:
        return None
    out = (magnitude > 0) & torch.isfinite(magnitude) & ((magnitude < lo) | (magnitude > hi))
    if not bool(out.any()):
        return None
    # frexp gives magnitude = mantissa·2^e with mantissa in [0.5, 1): s = 2^e is exact
    _, e = torch.frexp(torch.where(out, magnitude, 1.0))
    return torch.where(out, torch.ldexp(torch.ones_like(magnitude), e), 1.0)


def _rescale_info(info: SolveInfo, s: Tensor, atol: float) -> SolveInfo:
    """Statistics of the rescaled solve in the caller's units (absolute residuals × s)."""
    traj = None if info.trajectory is None else [t * s[:, None] for t in info.trajectory]
    return replace(info, atol=atol, residual=info.residual * s, trace=info.trace.scaled(1.0 / s),
                   trajectory=traj, extra={**info.extra, "rescaled_rows": int((s != 1).sum())})


def _atol_rows(atol: float, s: Tensor) -> float | Tensor:
    return atol / s if atol else 0.0


def solve_forward_rescaled(solver: Callable, g: Callable, z0: Tensor, gz0: Tensor | None, *, atol: float = 0.0,
                           **kwargs) -> tuple[Tensor, SolveInfo]:
    """Run the forward ``solver`` on ``z = g(z)`` (``(S, N)`` rows), rescaled row by row when
    its magnitude ``max(‖z0‖, ‖g(z0)‖)`` is outside the safe band. ``gz0`` is ``g(z0)`` when
    the caller has it already (it is handed to the solver's first evaluation instead of
    evaluating ``g`` again). Solvers marked ``scale_equivariant`` are rescaled; others run
    as given."""
    if gz0 is None:
        gz0 = g(z0)
    s = None
    if getattr(solver, "scale_equivariant", False):
        s = row_scales(torch.maximum(row_norm(z0), row_norm(gz0)))
    if s is None:
        start, first, call = z0, gz0, g
    else:
        col = s[:, None]

        def call(z: Tensor, rows: Tensor | None = None) -> Tensor:
            if rows is None:
                return g(z * col) / col
            sub = col.index_select(0, rows)
            return g(z * sub, rows=rows) / sub

        start, first = z0 / col, gz0 / col
    pending = [first]

    def g_first(z: Tensor, rows: Tensor | None = None) -> Tensor:
        if pending and rows is None and z is start:
            return pending.pop()  # the solver's first evaluation, at z0: already known
        pending.clear()
        return call(z) if rows is None else call(z, rows=rows)

    g_first.__dict__.update(getattr(g, "__dict__", {}))
    z, info = solver(g_first, start, atol=atol if s is None else _atol_rows(atol, s), **kwargs)
    pending.clear()
    if s is None:
        return z, info
    return z * s[:, None], _rescale_info(info, s, atol)


def solve_linear_rescaled(solve: Callable, b: Tensor, *, x0: Tensor | None = None, atol: float = 0.0,
                          **kwargs) -> tuple[Tensor, SolveInfo]:
    """Run ``solve(b, x0, atol=…, **kwargs)`` for ``A x = b`` on ``(S, N)`` rows, with the rows of
    ``b`` (and of the initial guess ``x0``) whose norm is outside the safe band brought to
    norm ≈ 1 (x is linear in b)."""
    s = row_scales(row_norm(b))
    if s is None:
        return solve(b, x0, atol=atol, **kwargs)
    x0 = None if x0 is None else x0 / s[:, None]
    x, info = solve(b / s[:, None], x0, atol=_atol_rows(atol, s), **kwargs)
    return x * s[:, None], _rescale_info(info, s, atol)
