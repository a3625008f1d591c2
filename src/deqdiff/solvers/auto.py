"""``"auto"``: Picard iteration, with Anderson acceleration for the rows it leaves.

Per sample, plain iteration z ← g(z) costs one evaluation of g, while an Anderson step with
memory m also reads and writes 2m history columns: on narrow states (tens to a few hundred
unknowns per sample, the physics-informed DEQs) those vector passes cost several evaluations of
g, and on the contractive maps that DEQs are trained to be, Anderson saves fewer iterations
than that (measured in ``benchmarks/bench_pattern.py``: plain iteration finishes the forward
solve in about half of Anderson's time). Anderson (Walker & Ni 2011) pays where plain iteration
is slow or diverges, which is a minority of samples. So every sample first runs plain iteration
for at most ``picard_iter`` iterations; the samples still running then continue with Anderson
(:func:`deqdiff.solvers.anderson.anderson`, options ``m``, ``beta``, ``lam``, ``restart``, …)
from their last iterate, or from their start where plain iteration made the residual larger.
Each sample's answer depends on that sample only (not on the batch).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .anderson import anderson
from .base import SolveInfo, compaction, merge_rows, register_solver
from .fixed_point_iteration import fixed_point_iteration

#: plain iterations per sample before the samples still running switch to Anderson
PICARD_ITER = 40


@register_solver("auto")
def auto(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-6,
    atol: float | Tensor = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
    picard_iter: int = PICARD_ITER,
    **anderson_options,
) -> tuple[Tensor, SolveInfo]:
    """Plain iteration for at most ``picard_iter`` ≥ 0 iterations, then Anderson on the rows
    still running for the rest of ``max_iter`` (module docstring). Iterations add up per row;
    ``info.extra["finished_rows"]`` counts the rows Anderson finished."""
    if int(picard_iter) != picard_iter or picard_iter < 0:
        raise ValueError(f"auto: picard_iter must be an integer >= 0, got {picard_iter}")
    k0 = min(int(picard_iter), int(max_iter))
    if k0 == 0:
        z, info = anderson(g, z0, tol=tol, atol=atol, max_iter=max_iter, scale=scale,
                           store_trajectory=store_trajectory, **anderson_options)
        info.solver = "auto"
        return z, info
    z, info = fixed_point_iteration(g, z0, tol=tol, atol=atol, max_iter=k0, scale=scale,
                                    store_trajectory=store_trajectory)
    info.solver = "auto"
    if info.all_converged or k0 == max_iter:
        return z, info
    rows = (~info.converged).nonzero().flatten()
    res0 = info.trace.first(0)  # every row's residual at its start
    grew = ~(info.residual.index_select(0, rows) <= res0.index_select(0, rows))
    start = torch.where(grew[:, None], z0.index_select(0, rows), z.index_select(0, rows))
    sub_g = _on_rows(g, rows, z)
    sub_atol = atol.index_select(0, rows) if isinstance(atol, Tensor) else atol
    sub_scale = None if scale is None else scale.index_select(0, rows)
    z_rows, sub = anderson(sub_g, start, tol=tol, atol=sub_atol, max_iter=max_iter - k0, scale=sub_scale,
                           store_trajectory=store_trajectory, **anderson_options)
    out = z.index_copy(0, rows, z_rows)
    merged = merge_rows(info, rows, sub, "auto")
    if store_trajectory:
        merged.trajectory = info.trajectory + [z.index_copy(0, rows, t) for t in sub.trajectory]
    return out, merged


def _on_rows(g: Callable, idx: Tensor, z: Tensor) -> Callable:
    """``g`` on the rows ``idx`` of the batch: through its row subsets where it has them,
    else by evaluating the whole batch (the other rows held at ``z``) and keeping ``idx``."""
    if compaction(g):
        def sub(v: Tensor, rows: Tensor | None = None) -> Tensor:
            return g(v, rows=idx if rows is None else idx.index_select(0, rows))

        sub.row_subsets = True
        return sub

    def full(v: Tensor) -> Tensor:
        return g(z.index_copy(0, idx, v)).index_select(0, idx)

    return full
