"""Linear solvers for A x = b on ``(S, N)`` right-hand sides, and their shared helpers.

Stopping rule per row: ‖b − A x‖ ≤ atol + tol‖b‖; rows with b = 0 return x = 0 at
iteration 0. Richardson and Anderson have no loop of their own: they run the forward
solvers on the affine map g(x) = x + ω(b − A x), whose residual g(x) − x = ω(b − A x) is
the scaled linear residual (see :func:`forward_as_linear`). Krylov solvers live in
``gmres.py`` and ``bicgstab.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .anderson import anderson
from .base import SolveInfo, Tracker, register_solver, row_norm
from .fixed_point_iteration import fixed_point_iteration


def linear_start(op, b: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Initial guess (zeros if ``x0`` is None, and exactly 0 on rows with b = 0), its
    residual r = b − A x0 (exactly 0 on rows with b = 0) and ‖b‖ per row."""
    bnorm = row_norm(b)
    zero_b = (bnorm == 0)[:, None]
    x = torch.zeros_like(b) if x0 is None else torch.where(zero_b, 0.0, x0.to(b))
    r = b if x0 is None else torch.where(zero_b, 0.0, b - op.mv(x))
    return x, r, bnorm


def scaled_start(op, b: Tensor, x0: Tensor, bound: Tensor, omega: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(x, g(x))``: the start ``x = α x0`` with α per row minimizing ‖b − α A x0‖ (α = 0 on rows
    with b = 0 or a non-finite x0), except on rows where ``x0`` already meets ``‖b − A x0‖ ≤
    bound`` (α = 1, kept as given), and the Richardson step from it, g(x) = x + ω(b − A x). The
    residual is at most ‖b‖ and ‖b − A x0‖, so the start is never worse than zero or than ``x0``
    itself, and it is exact when only the right-hand side's per-row scale changed since ``x0``
    solved the system — the derivative solves of a training step warm-started from the previous
    step carry per-sample loss residuals in their right-hand sides, which change magnitude and
    sign from step to step. One product with A (with ``I − A`` where the operator has it, so a
    row with α = 1 or 0 takes the step a plain start would, to the bit)."""
    x0 = x0.to(b)
    complement = omega == 1.0 and hasattr(op, "complement_mv")
    Jx = op.complement_mv(x0) if complement else None  # (I − A) x0
    Ax = x0 - Jx if complement else op.mv(x0)
    num, den = torch.linalg.vecdot(b, Ax), torch.linalg.vecdot(Ax, Ax)
    alpha = num / torch.where(den > 0, den, 1.0)
    alpha = torch.where(torch.isfinite(alpha) & (den > 0), alpha, 0.0)
    alpha = torch.where(row_norm(b - Ax) <= bound, 1.0, alpha)[:, None]
    zero = alpha == 0  # a zero start exactly, even where x0 is not finite
    x = torch.where(zero, 0.0, alpha * x0)
    g = b + alpha * Jx if complement else x + omega * (b - alpha * Ax)
    return x, torch.where(zero, omega * b, g)


#: iterations before a linear solve shrinks to its running rows: restricting the operator
#: re-linearizes it there (an evaluation of f and its pullback), which pays only on solves that
#: run longer (measured: the PIDEQ setup's derivative solves take ~7
#: iterations, and re-linearizations were 16 % of its epoch)
LINEAR_COMPACT_FROM = 8


def forward_as_linear(forward: Callable, name: str) -> Callable:
    """Turn a forward solver into a linear one by solving x = g(x) = x + ω(b − A x).

    The forward solve runs with ``scale = ω‖b‖`` and ``atol = ω·atol``, so its rule
    ‖g(x) − x‖ ≤ ω·atol + tol·ω‖b‖ is exactly ‖b − A x‖ ≤ atol + tol‖b‖. The returned
    info is relabelled (``name``, kind "linear") with absolute residuals divided by ω.
    Remaining options are passed to the forward solver."""

    def solve(
        op,
        b: Tensor,
        x0: Tensor | None,
        *,
        tol: float = 1e-6,
        atol: float = 0.0,
        max_iter: int = 200,
        omega: float = 1.0,
        **options,
    ) -> tuple[Tensor, SolveInfo]:
        if not omega > 0:
            raise ValueError(f"{name}: relaxation omega must be > 0, got {omega}")
        bnorm = row_norm(b)
        # from x = 0 the iteration's first step g(0) = ωb needs no product with A: the solver
        # starts there, at iterate 1 (iterate 0 and its residual ‖b‖ are entered afterwards)
        from_zero = x0 is None
        if from_zero:
            x, first = (b if omega == 1.0 else omega * b), []
        else:  # a given start, scaled per row to the least residual; its product serves g
            x, gx = scaled_start(op, b, x0, atol + tol * bnorm, omega)
            first = [(x, gx)]
        restricted: dict = {}

        def step(A, rhs: Tensor, v: Tensor) -> Tensor:
            if omega == 1.0 and hasattr(A, "complement_mv"):
                return rhs + A.complement_mv(v)  # x + (b − A x) = b + (I − A) x
            return v + omega * (rhs - A.mv(v))

        def g(v: Tensor, rows: Tensor | None = None) -> Tensor:
            if first:
                start, g_start = first.pop()
                if rows is None and v is start:
                    return g_start
            if rows is None:
                return step(op, b, v)
            if restricted.get("rows") is not rows:  # the solver compacted: restrict A once
                restricted.update(rows=rows, op=op.restrict(rows), b=b.index_select(0, rows))
            return step(restricted["op"], restricted["b"], v)

        g.row_subsets = getattr(op, "can_restrict", False)
        g.compact_from = LINEAR_COMPACT_FROM
        # from x = 0, rows with b = 0 stay at their answer 0 (g(0) = ωb): the loop need not watch them
        static = (bnorm == 0) if from_zero else None
        g.static_rows = static
        scale = bnorm if omega == 1.0 else omega * bnorm
        x, info = forward(g, x, tol=tol, atol=omega * atol, max_iter=max_iter - from_zero, scale=scale, **options)
        iterations, trace, traj = info.iterations, info.trace, info.trajectory
        if from_zero:  # renumbered as from x = 0: iterate 0 (residual ‖g(0) − 0‖ = scale, relative 1)
            iterations = iterations + (~static).to(iterations.dtype)  # rows not static took one more
            trace = trace.after(scale, scale)
            traj = None if traj is None else [torch.zeros_like(traj[0]), *traj]
        info = replace(
            info,
            solver=name,
            kind="linear",
            atol=atol,
            iterations=iterations,
            residual=info.residual if omega == 1.0 else info.residual / omega,
            trace=trace.scaled(omega),
            trajectory=traj,
            extra={**info.extra, "omega": omega},
        )
        return x, info

    solve.__name__ = solve.__qualname__ = name
    solve.__doc__ = (
        f"Linear solve of A x = b by the forward solver '{forward.__name__}' on "
        f"g(x) = x + ω(b − A x) (relaxation ``omega`` > 0; other options go to the forward solver)."
    )
    return solve


richardson = register_solver("richardson", "linear")(forward_as_linear(fixed_point_iteration, "richardson"))
anderson_linear = register_solver("anderson", "linear")(forward_as_linear(anderson, "anderson"))


@register_solver("dense", "linear")
def dense(
    op, b: Tensor, x0: Tensor | None = None, *, tol: float = 1e-6, atol: float = 0.0, max_iter: int = 4
) -> tuple[Tensor, SolveInfo]:
    """Direct solve x = A⁻¹ b through ``op.dense_solve(b)`` (the operator's cached
    factorization), then up to ``max_iter`` − 1 (at most 3) steps of iterative refinement
    x ← x + A⁻¹(b − A x) while rows are above tolerance: on nearly singular rows (ρ(∂f/∂z)
    close to 1, float32) one LU solve alone can miss the tolerance, and refinement reuses the
    factorization. ``x0`` is ignored; iterations = LU solves used."""
    bnorm = row_norm(b)
    zero = (bnorm == 0)[:, None]
    x = torch.where(zero, 0.0, op.dense_solve(b))
    track = Tracker(x, tol, atol)
    r = b - op.mv(x)
    running = track.update(1, x, row_norm(r), bnorm)
    for k in range(2, min(int(max_iter), 4) + 1):
        if track.finished:
            break
        x = torch.where(running[:, None] & ~zero, x + op.dense_solve(r), x)
        r = b - op.mv(x)
        running = track.update(k, x, row_norm(r), bnorm)
    return track.result, track.info("dense", "linear")
