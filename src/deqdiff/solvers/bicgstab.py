"""BiCGStab (van der Vorst) for A x = b, batched over independent rows.

Per row, with shadow residual r̂ (initially r_0):
    ρ = ⟨r̂, r⟩,  β = (ρ/ρ_prev)(α/ω),  p ← r + β(p − ω v),  v = A p,
    α = ρ/⟨r̂, v⟩,  s = r − α v,  t = A s,  ω = ⟨t, s⟩/⟨t, t⟩,
    x ← x + α p + ω s,  r ← s − ω t.
A row whose half-step residual ‖s‖ already meets the tolerance takes x + α p.
Breakdown guards (per row): if ρ ≈ 0, ⟨r̂, v⟩ ≈ 0 or ω ≈ 0 the row restarts with
r̂ = p = r (with α = 0 the step degenerates to the minimal-residual step x + ω r).
Convergence claimed by the recursive residual is checked against the true residual
b − A x; a row that fails the check continues from the true residual (restarted).
One iteration = two matvecs (plus the checks, counted in ``extra["matvecs"]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, register_solver, row_norm
from .linear import linear_start


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1)


def _safe(d: Tensor) -> Tensor:
    return torch.where(d != 0, d, 1.0)


@register_solver("bicgstab", "linear")
def bicgstab(
    op, b: Tensor, x0: Tensor | None = None, *, tol: float = 1e-6, atol: float = 0.0, max_iter: int = 200
) -> tuple[Tensor, SolveInfo]:
    """BiCGStab with per-row breakdown restarts; ``max_iter`` counts iterations."""
    eps = torch.finfo(b.dtype).eps
    x, r, bnorm = linear_start(op, b, x0)
    thresh = atol + tol * bnorm
    track = Tracker(x, tol, atol)
    running = track.update(0, x, row_norm(r), bnorm)
    matvecs = int(x0 is not None)
    S = b.shape[0]
    rhat, p, v = r, torch.zeros_like(b), torch.zeros_like(b)
    rho_prev, alpha, omega = b.new_ones(S), b.new_ones(S), b.new_ones(S)
    fresh = torch.ones(S, dtype=torch.bool, device=b.device)  # restart: r̂ = p = r
    for k in range(1, max_iter + 1):
        if track.finished:
            break
        rho = _dot(rhat, r)
        fresh = fresh | (rho.abs() <= eps * row_norm(rhat) * row_norm(r))
        rhat = torch.where(fresh[:, None], r, rhat)
        rho = torch.where(fresh, _dot(r, r), rho)
        beta = (rho / _safe(rho_prev)) * (alpha / _safe(omega))
        p = torch.where(fresh[:, None], r, r + beta[:, None] * (p - omega[:, None] * v))
        v = op.mv(p)
        sigma = _dot(rhat, v)
        ok = sigma.abs() > eps * row_norm(rhat) * row_norm(v)
        alpha = torch.where(ok, rho / _safe(sigma), 0.0)
        s = r - alpha[:, None] * v
        t = op.mv(s)
        matvecs += 2
        tn = row_norm(t)  # ω = ⟨t, s⟩/⟨t, t⟩ via t/‖t‖: ⟨t, t⟩ under/overflows when A is tiny/huge
        omega = torch.where(tn > 0, _dot(t / _safe(tn)[:, None], s) / _safe(tn), 0.0)
        half = (row_norm(s) <= thresh)[:, None]
        x_new = torch.where(half, x + alpha[:, None] * p, x + alpha[:, None] * p + omega[:, None] * s)
        r_new = torch.where(half, s, s - omega[:, None] * t)
        res = row_norm(r_new)
        claim = running & (res <= thresh)
        if claim.any():  # verify with the true residual; replace the recursive one
            r_true = b - op.mv(x_new)
            matvecs += 1
            res = torch.where(claim, row_norm(r_true), res)
            r_new = torch.where(claim[:, None], r_true, r_new)
        x = torch.where(running[:, None], x_new, x)
        r = torch.where(running[:, None], r_new, r)
        running = track.update(k, x, res, bnorm)
        rho_prev = rho
        fresh = ~ok | (omega.abs() * tn <= eps * row_norm(s)) | claim | ~running
    return track.result, track.info("bicgstab", "linear", matvecs=matvecs)
