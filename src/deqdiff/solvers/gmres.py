"""Restarted GMRES(m) for A x = b, batched over independent rows.

Each cycle starts from the true residual r = b − A x, β = ‖r‖, v_1 = r/β, and builds per
row the Arnoldi relation A V_j = V_{j+1} H̄_j by classical Gram–Schmidt, repeated once
when the first pass cancelled most of the vector (CGS2 with the DGKS criterion: as stable
as modified Gram–Schmidt, but batched contractions instead of j sequential ones).
Givens rotations reduce H̄_j to upper-triangular R_j while rotating β e_1 into g, so the
least-squares residual min_y ‖β e_1 − H̄_j y‖ = |g_{j+1}| is known without forming x. A row stops extending its
basis when that estimate meets the tolerance or on happy breakdown (h_{j+1,j} ≈ 0). At the
end of the cycle (after m steps, or once no row is extending) x + V_j R_j⁻¹ g_{1:j} is
formed and its true residual decides which rows have converged; the others restart.

``max_iter`` counts Arnoldi steps (one matvec each); the true residuals cost one more
matvec per cycle (``extra["matvecs"]`` counts all). The residual trace holds the
least-squares estimate after every Arnoldi step and the true residual after every cycle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, register_solver, row_norm
from .linear import linear_start


def _givens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row rotation (c, s) with [c s; −s c]·[a; b] = [r; 0]; identity where a = b = 0."""
    r = torch.hypot(a, b)
    nz = r > 0
    safe = torch.where(nz, r, 1.0)
    return torch.where(nz, a / safe, 1.0), torch.where(nz, b / safe, 0.0), r


def _krylov_update(x: Tensor, V: Tensor, R: Tensor, g: Tensor, length: Tensor) -> Tensor:
    """x + Σ_k y_k V_k with R y = g on the first ``length[s]`` Krylov directions of each
    row (``V`` is ``(S, j, N)``); unused (or numerically singular) directions get y = 0
    via an identity block."""
    j = R.shape[1]
    idx = torch.arange(j, device=x.device)
    use = idx[None, :] < length[:, None]  # (S, j)
    diag = R.diagonal(dim1=1, dim2=2)
    use = use & (diag.abs() > 0)
    eye = torch.eye(j, dtype=R.dtype, device=R.device)
    keep = use[:, :, None] & use[:, None, :]
    Rm = torch.where(keep, R, eye)
    y = torch.linalg.solve_triangular(Rm, torch.where(use, g, 0.0).unsqueeze(2), upper=True)
    return x + torch.bmm(y.transpose(1, 2), V).squeeze(1)


#: re-orthogonalize when a Gram–Schmidt pass removed more than this share of ‖w‖ (DGKS, 1/√2)
_REORTH = 0.7071


def _project_out(w: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """One classical Gram–Schmidt pass against the rows' bases ``V`` ``(S, j, N)``:
    returns (w − V h, h) with h = V w. Both contractions are (1×N)(N×j) and (1×j)(j×N)
    bmms: on CPU these orientations are several times faster than (j×N)(N×1)."""
    h = torch.bmm(w[:, None, :], V.transpose(1, 2)).squeeze(1)
    return w - torch.bmm(h[:, None, :], V).squeeze(1), h


@register_solver("gmres", "linear")
def gmres(
    op,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 200,
    restart: int = 20,
) -> tuple[Tensor, SolveInfo]:
    """GMRES restarted every ``restart`` ≥ 1 Arnoldi steps (capped at N)."""
    if int(restart) != restart or restart < 1:
        raise ValueError(f"gmres restart must be an integer >= 1, got {restart}")
    S, N = b.shape
    m = min(int(restart), N)
    eps = torch.finfo(b.dtype).eps
    x, r, bnorm = linear_start(op, b, x0)
    thresh = atol + tol * bnorm
    track = Tracker(x, tol, atol)
    running = track.update(0, x, row_norm(r), bnorm)  # rows with b = 0 stop here
    k, matvecs = 0, int(x0 is not None)
    V = b.new_zeros(S, m + 1, N)
    R = b.new_zeros(S, m, m)
    while not track.finished and k < max_iter:
        k_start = k
        beta = row_norm(r)
        R.zero_()
        V[:, 0] = r / torch.where(beta > 0, beta, 1.0)[:, None]
        gvec = b.new_zeros(S, m + 1)
        gvec[:, 0] = beta
        cs, sn = b.new_ones(S, m), b.new_zeros(S, m)
        active = running.clone()  # rows still extending their basis in this cycle
        length = torch.zeros(S, dtype=torch.long, device=b.device)
        for j in range(m):
            k += 1
            w = op.mv(V[:, j])
            matvecs += 1
            wnorm = row_norm(w)
            w, h = _project_out(w, V[:, : j + 1])
            hn = row_norm(w)
            if (active & (hn < _REORTH * wnorm)).any():  # cancellation: orthogonalize again
                w, h2 = _project_out(w, V[:, : j + 1])
                h, hn = h + h2, row_norm(w)
            breakdown = hn <= 10 * eps * wnorm
            V[:, j + 1] = torch.where(breakdown[:, None], 0.0, w / torch.where(breakdown, 1.0, hn)[:, None])
            h = torch.cat([h, hn[:, None]], 1)
            for i in range(j):  # previous rotations
                hi = cs[:, i] * h[:, i] + sn[:, i] * h[:, i + 1]
                h[:, i + 1] = -sn[:, i] * h[:, i] + cs[:, i] * h[:, i + 1]
                h[:, i] = hi
            cs[:, j], sn[:, j], h[:, j] = _givens(h[:, j], h[:, j + 1])
            R[:, : j + 1, j] = h[:, : j + 1]
            gvec[:, j + 1] = -sn[:, j] * gvec[:, j]
            gvec[:, j] = cs[:, j] * gvec[:, j]
            est = gvec[:, j + 1].abs()
            length = torch.where(active, j + 1, length)
            active = active & ~((est <= thresh) | breakdown)
            if not active.any() or j == m - 1 or k == max_iter:
                break
            track.note(est, bnorm)
        x = _krylov_update(x, V[:, : j + 1], R[:, : j + 1, : j + 1],
                           gvec[:, : j + 1], length)
        r = b - op.mv(x)
        matvecs += 1
        # a row's iteration count is the Arnoldi steps it used, as if it were solved alone
        running = track.update(k_start + length, x, row_norm(r), bnorm)
    return track.result, track.info("gmres", "linear", restart=m, matvecs=matvecs)
