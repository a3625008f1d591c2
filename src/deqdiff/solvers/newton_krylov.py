"""Inexact Newton–Krylov method for z = g(z).

Newton's method on F(z) = g(z) − z: each step solves

    (I − J_g(z_k)) δ = g(z_k) − z_k,   z_{k+1} = z_k + δ,

approximately with restarted GMRES (:func:`deqdiff.solvers.gmres.gmres`) to the
relative inner tolerance η (constant forcing term: ‖F_k + J_F δ‖ ≤ η‖F_k‖, so near the
solution the residual contracts roughly by η per step). The Jacobian is never formed:
products J_g(z) v are the pullback of the pullback, v ↦ ∂/∂u ⟨J_gᵀ u, ·⟩ (two reverse
passes on detached leaves with a graph built once per Newton step), so the solver never
opens a forward-AD level of its own and runs unchanged while the caller holds dual tensors
(``torch.autograd.forward_ad``) or ``torch.func`` transforms. There is no line search; the
method is meant for problems where Newton converges from the initial guess (e.g.
contractive g). Converged rows get a zero right-hand side, which GMRES returns
immediately, so they are frozen.

Failure. A row stops, reported unconverged with its residual, when
* its Newton step is no descent direction: GMRES left ‖F + J_F δ‖ ≥ (1 − 1e-8)‖F‖ (the
  Newton system is singular along F, e.g. g(z) = z + 1 has J_F = 0), or the step is
  not finite — the step is not taken;
* its residual has not fallen below its best value for ``stall`` consecutive steps
  (Newton wandering where there is no root);
* its residual is not finite.
The loop ends when no row is running, so a map without a fixed point costs a few steps.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import SolveInfo, Tracker, register_solver, row_norm
from .gmres import gmres


class _NewtonOperator:
    """v ↦ (I − J_g(z)) v row-wise, with J_g v by a double reverse pass.

    ``gz`` = g(z) is evaluated once with a graph; J_gᵀu (u a dummy leaf) is recorded with
    ``create_graph`` and is linear in u, so its pullback at any v is J_g v. Under inference
    mode no graph can be recorded; there (no caller tangents either) the forward-mode
    ``torch.func.jvp`` is used instead."""

    def __init__(self, g: Callable[[Tensor], Tensor], z: Tensor):
        self.g = g
        self.z = z.detach().clone()  # own storage: z may be an expanded view (vmap rule)
        self._dual = torch.is_inference_mode_enabled()
        if self._dual:
            self.gz = g(self.z)
            return
        with torch.enable_grad():
            zz = self.z.clone().requires_grad_(True)
            gz = g(zz)
            if not gz.requires_grad:  # g ignores z: J_g = 0
                self.gz, self._u, self._gtu = gz.detach(), None, None
                return
            u = torch.zeros_like(gz, requires_grad=True)
            (gtu,) = torch.autograd.grad(gz, zz, u, create_graph=True, allow_unused=True,
                                         materialize_grads=True)
        self.gz, self._u, self._gtu = gz.detach(), u, gtu

    def mv(self, v: Tensor) -> Tensor:
        if self._dual:
            return v - torch.func.jvp(self.g, (self.z,), (v,))[1]
        if self._gtu is None or not self._gtu.requires_grad:  # J_gᵀu does not depend on u: J_g = 0
            return v.clone()
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(self._gtu, self._u, v, retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
        return v - jv


#: inner relative residual at or above which a Newton step counts as no descent
_NO_DESCENT = 1.0 - 1e-8


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
    stall: int = 5,
) -> tuple[Tensor, SolveInfo]:
    """Newton steps (``max_iter`` counts them) with GMRES(``restart``) inner solves to
    relative tolerance ``eta`` ∈ (0, 1) in at most ``inner_max_iter`` ≥ 1 matvecs; a row
    stops unconverged after ``stall`` ≥ 1 steps without a new best residual, or at a
    non-descent step (module docstring). ``extra["inner_matvecs"]`` is the total number of
    Jacobian-vector products; ``extra["stopped"]`` the per-row reason a row gave up
    (0: it did not, 1: no descent direction, 2: stagnation, 3: non-finite residual)."""
    if not 0.0 < eta < 1.0:
        raise ValueError(f"newton_krylov forcing term eta must be in (0, 1), got {eta}")
    if int(inner_max_iter) != inner_max_iter or inner_max_iter < 1:
        raise ValueError(f"newton_krylov inner_max_iter must be an integer >= 1, got {inner_max_iter}")
    if int(restart) != restart or restart < 1:
        raise ValueError(f"newton_krylov restart must be an integer >= 1, got {restart}")
    if int(stall) != stall or stall < 1:
        raise ValueError(f"newton_krylov stall must be an integer >= 1, got {stall}")
    S = z0.shape[0]
    track = Tracker(z0, tol, atol, store_trajectory)
    stopped = torch.zeros(S, dtype=torch.long, device=z0.device)  # reason a row gave up (0: none)
    best = torch.full((S,), float("inf"), dtype=z0.dtype, device=z0.device)
    since_best = torch.zeros(S, dtype=torch.long, device=z0.device)
    z = z0
    inner = 0
    for k in range(max_iter + 1):
        op = _NewtonOperator(g, z)
        gz = op.gz
        F = gz - z
        res = row_norm(F)
        sc = row_norm(gz) if scale is None else scale
        # given-up rows are left out of the record: their statistics stay those of their last step
        live = (stopped == 0).nonzero().squeeze(1)
        if live.numel() == S:
            running = track.update(k, z, res, sc)
        else:
            running = torch.zeros(S, dtype=torch.bool, device=z.device)
            running[live] = track.update(k, z[live], res[live], sc[live], rows=live)
        improved = res < best
        best = torch.where(improved, res, best)
        since_best = torch.where(improved, 0, since_best + 1)
        stopped = torch.where(running & ~torch.isfinite(res), 3, stopped)
        stopped = torch.where(running & (stopped == 0) & (since_best >= stall), 2, stopped)
        running = running & (stopped == 0)
        if not bool(running.any()) or k == max_iter:
            break
        rhs = torch.where(running[:, None], F, 0.0)
        delta, info = gmres(op, rhs, None, tol=eta, max_iter=inner_max_iter, restart=restart)
        inner += info.extra["matvecs"]
        descent = torch.isfinite(delta).all(1) & (info.residual < _NO_DESCENT * res)
        stopped = torch.where(running & ~descent, 1, stopped)
        step = running & descent
        z = torch.where(step[:, None], z + torch.where(step[:, None], delta, 0.0), z)
    return track.result, track.info(
        "newton_krylov", "forward", eta=eta, inner_max_iter=inner_max_iter, restart=restart, stall=stall,
        inner_matvecs=inner, stopped=stopped,
    )
