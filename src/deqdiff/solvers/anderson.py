"""Anderson acceleration (type II) for z = g(z).

With residuals F_k = g(z_k) − z_k and the last m_k = min(m, k) differences
ΔZ = [z_{i+1} − z_i], ΔF = [F_{i+1} − F_i] (columns, per row), each step solves the
regularized least-squares problem

    γ = argmin ‖F_k − ΔF γ‖² + λ‖γ‖²   ⇔   (ΔFᵀΔF + λ I) γ = ΔFᵀ F_k

and mixes  z_{k+1} = z_k + β F_k − (ΔZ + β ΔF) γ.
The first step (empty history) is the damped Picard step z_1 = z_0 + β F_0.

Safeguard (restart): a row whose residual grew, ‖F_k‖ > restart·‖F_{k−1}‖, drops its history
and takes the plain mixing step z_k + β F_k, at most ``max_restarts`` times. Far from the fixed
point the secant model of a nonlinear g extrapolates badly: without the restart a few rows of
a PIDEQ in training bounced for 200+ iterations where plain iteration needed 49, the forward
solve failed and the training derailed (benchmarks/RESULTS.md §3). The budget keeps the
extrapolation where Anderson converges only through non-monotone steps (a monotone DEQ whose
plain iteration diverges): restarting at every growth broke those.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, compact_now, compaction, register_solver, row_norm, static_rows


def solve_small(G: Tensor, r: Tensor) -> Tensor:
    """``G⁻¹ r`` for a batch of small symmetric positive definite systems ``G`` ``(S, m, m)``,
    ``r`` ``(S, m)``, by Gaussian elimination without pivoting (backward stable on SPD
    matrices, like Cholesky), vectorized over the batch: O(m³) operations on ``(S,)`` vectors.
    A batched LAPACK solve of thousands of 5 × 5 systems costs a call per matrix (≈ 20× an
    evaluation of a 32-wide cell on 20 000 rows, measured); this costs a few dozen vector
    operations. A singular system gives non-finite entries (the caller's guard)."""
    m = G.shape[-1]
    a = [[G[:, i, j] for j in range(m)] for i in range(m)]
    b = [r[:, i] for i in range(m)]
    for k in range(m):
        for i in range(k + 1, m):
            l = a[i][k] / a[k][k]
            for j in range(k + 1, m):
                a[i][j] = a[i][j] - l * a[k][j]
            b[i] = b[i] - l * b[k]
    x: list[Tensor] = [b[0]] * m
    for i in reversed(range(m)):
        acc = b[i]
        for j in range(i + 1, m):
            acc = acc - a[i][j] * x[j]
        x[i] = acc / a[i][i]
    return torch.stack(x, 1)


#: batches of at least this many rows, with memories up to ``SMALL_SOLVE_MAX_M``, solve their
#: least-squares systems by :func:`solve_small` (below it, the per-operation cost of its few
#: dozen vector operations exceeds LAPACK's per-matrix cost; the two differ by rounding only)
SMALL_SOLVE_MIN_ROWS = 256
SMALL_SOLVE_MAX_M = 8


def anderson_weights(gram: Tensor, rhs: Tensor, lam: float, running: Tensor) -> Tensor:
    """Per-row Tikhonov-regularized least-squares weights γ ``(S, m_k)``.

    ``gram`` = ΔFᵀΔF ``(S, m_k, m_k)`` and ``rhs`` = ΔFᵀF ``(S, m_k)``. The regularization
    is relative: λ_s = lam · tr(ΔF_sᵀΔF_s)/m_k (invariant to the scale of the residuals).
    Rows not running, rows with a zero history and rows whose system is singular get γ = 0
    (a plain mixing step), so no row can poison the batched solve."""
    mk = gram.shape[-1]
    eye = torch.eye(mk, dtype=gram.dtype, device=gram.device).expand_as(gram)
    trace = gram.diagonal(dim1=1, dim2=2).sum(1)
    usable = running & (trace > 0)
    reg = (lam / mk) * trace
    gram = torch.where(usable[:, None, None], gram + reg[:, None, None] * eye, eye)
    if mk <= SMALL_SOLVE_MAX_M and gram.shape[0] >= SMALL_SOLVE_MIN_ROWS:
        gamma = solve_small(gram, rhs)
    else:
        gamma = torch.linalg.solve_ex(gram, rhs.unsqueeze(2))[0].squeeze(2)
    ok = usable & torch.isfinite(gamma).all(1)
    return torch.where(ok[:, None], gamma, torch.zeros_like(gamma))


@register_solver("anderson")
def anderson(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-8,
    restart: float | None = 1.0,
    max_restarts: int = 50,
    mixer: Callable | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Anderson acceleration with memory ``m`` ≥ 1, mixing ``beta`` ∈ (0, 1] and relative
    Tikhonov regularization ``lam`` ≥ 0 (see :func:`anderson_weights`); ``restart`` ≥ 1 (or
    None: never) is the residual growth that restarts a row, at most ``max_restarts`` times
    per row (module docstring).

    The history is a ring buffer of the last ``m`` differences (the least-squares problem does
    not depend on the column order), kept as ``m`` columns ``(S, N)`` of ΔF and of ΔZ + βΔF,
    the one combination the mixing step needs; its Gram matrix ΔFᵀΔF is kept up to date one
    row/column per step instead of being rebuilt, and the small systems are solved by
    :func:`solve_small`. All rows advance in
    lockstep, so the history length m_k is shared; the weights are per row and converged
    rows are frozen. Run with autograd recording (an unrolled baseline) the history is
    updated out of place, so the recorded loop can be differentiated.

    ``mixer`` (optional) supplies each step's weights and mixing from outside, as the learned
    solver of Bai, Koltun & Kolter (2022) does (:mod:`deqdiff.solvers.neural`):
    ``mixer(k, F, res, dF, gram, rhs, gamma, rows, newest) -> (gamma, beta_k)`` receives the
    running state's residuals ``F`` ``(S, N)`` and their norms ``res`` ``(S,)``, the history
    ``dF`` ``(S, m_k, N)`` (ring order; column ``newest`` is the latest), its Gram matrix and
    ΔFᵀF, the least-squares weights ``gamma`` ``(S, m_k)`` and ``rows`` (the batch indices the
    state holds, None: all), and returns the weights and one mixing β per row ``(S,)`` to use.
    It is called at every step, the first with an empty history (``m_k = 0``)."""
    if int(m) != m or m < 1:
        raise ValueError(f"anderson memory m must be an integer >= 1, got {m}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"anderson mixing beta must be in (0, 1], got {beta}")
    if lam < 0:
        raise ValueError(f"anderson regularization lam must be >= 0, got {lam}")
    if restart is not None and not restart >= 1.0:
        raise ValueError(f"anderson restart must be >= 1 (or None), got {restart}")
    if int(max_restarts) != max_restarts or max_restarts < 0:
        raise ValueError(f"anderson max_restarts must be an integer >= 0, got {max_restarts}")
    m = int(m)
    S, N = z0.shape
    # ring buffers of the last m history columns, each (S, N): ΔF and ΔZ + βΔF (the only
    # combination the mixing step uses). Columns, not one (S, m, N) tensor: with a narrow state
    # the batched products of an (S, m, N) history cost a kernel call per row (measured 20–40×
    # an evaluation of g at N = 32, S = 20 000); per-column vector products do not.
    dF: list[Tensor] = []
    dM: list[Tensor] = []
    gram = z0.new_zeros(S, m, m)
    track = Tracker(z0, tol, atol, store_trajectory, static=static_rows(g))
    compact = compaction(g)
    z, z_prev, F_prev, res_prev = z0, z0, z0, None
    restarts = torch.zeros(S, dtype=torch.long, device=z0.device)
    rows = None  # indices of the rows the state holds (None: all)
    recorded = False  # autograd records the loop (an unrolled baseline): no in-place updates
    for k in range(max_iter + 1):
        gz = g(z) if rows is None else g(z, rows=rows)
        recorded = recorded or gz.requires_grad
        F = gz - z
        sc = row_norm(gz) if scale is None else (scale if rows is None else scale[rows])
        res = track.residual_norm(F, rows)
        running = track.update(k, z, res, sc, rows)
        if track.finished or k == max_iter:
            break
        b = beta  # the mixing of this step: a number, or one per row from the mixer
        if k == 0:
            if mixer is not None:
                empty = F.new_zeros(F.shape[0], 0, N)
                _, b = mixer(k, F, res, empty, gram[:, :0, :0], F[:, :0], F[:, :0], rows, 0)
                b = b[:, None]
            step = b * F
        else:
            col = (k - 1) % m
            mk = min(k, m)
            dF_col = F - F_prev
            dM_col = torch.add(z - z_prev, dF_col, alpha=beta)
            if col < len(dF):
                dF[col], dM[col] = dF_col, dM_col
            else:
                dF.append(dF_col)
                dM.append(dM_col)
            if recorded:  # the previous step's products saved the Gram matrix for backward
                gram = gram.clone()
            # the mixing algebra runs in the state's dtype even when g runs under autocast
            with torch.autocast(z.device.type, enabled=False):
                dots = torch.stack([torch.linalg.vecdot(dF[j], dF_col) for j in range(mk)], 1)
                rhs = torch.stack([torch.linalg.vecdot(dF[j], F) for j in range(mk)], 1)
                gram[:, col, :mk] = dots
                gram[:, :mk, col] = dots
                # the ring holds the new columns: no second reference may outlive a restart or a
                # compaction, which rebuild the history (one state-sized column pair more at the peak)
                del dF_col, dM_col
                gamma = anderson_weights(gram[:, :mk, :mk], rhs, lam, running)  # (S, m_k)
                if mixer is not None:
                    gamma, b = mixer(k, F, res, torch.stack(dF, 1), gram[:, :mk, :mk], rhs, gamma, rows, col)
                    b = b[:, None]
                step = b * F
                for j in range(mk):
                    step = torch.addcmul(step, gamma[:, j:j + 1], dM[j], value=-1.0)
                    if mixer is not None:  # dM holds ΔZ + βΔF for the loop's β; this step mixes with b
                        step = step - (b - beta) * gamma[:, j:j + 1] * dF[j]
            if restart is not None:
                grew = (res > restart * res_prev) & (restarts < max_restarts)
                if bool(grew.any()):
                    restarts += grew
                    if recorded:  # out of place: the recorded loop saved them
                        hold = (~grew).to(F.dtype)[:, None]
                        dF, dM = [c * hold for c in dF], [c * hold for c in dM]
                        gram = gram * hold[:, :, None]
                        step = torch.where(grew[:, None], b * F, step)
                    else:  # the loop owns its history: clear the few rows that grew in place
                        idx = grew.nonzero().squeeze(1)
                        for c in (*dF, *dM, gram):
                            c.index_fill_(0, idx, 0.0)
                        bF = F.index_select(0, idx)
                        step.index_copy_(0, idx, bF * (b.index_select(0, idx) if isinstance(b, Tensor) else b))
        z_prev, F_prev, res_prev = z, F, res
        z = torch.where(running[:, None], z + step, z)
        if compact and compact_now(g, k, running):
            keep = running.nonzero().squeeze(1)
            z, z_prev, F_prev, res_prev = z[keep], z_prev[keep], F_prev[keep], res_prev[keep]
            restarts = restarts[keep]
            dF, dM = [c[keep] for c in dF], [c[keep] for c in dM]  # one column at a time: no second history
            gram = gram[keep]
            rows = keep if rows is None else rows[keep]
    return track.result, track.info("anderson", "forward", m=m, beta=beta, lam=lam, restart=restart,
                                    max_restarts=max_restarts)
