"""ODE problems and their ``scipy.integrate.solve_ivp`` references.

Van der Pol oscillator:  ``ẏ₁ = y₂``,  ``ẏ₂ = μ(1 − y₁²) y₂ − y₁``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["van_der_pol", "van_der_pol_numpy", "reference_trajectory", "reference_flow", "limit_cycle_extent"]


def van_der_pol(t: Tensor, y: Tensor, mu: Tensor | float = 1.0) -> Tensor:
    """Right-hand side ``F(t, y; μ)`` for a batch ``y`` ``(B, 2)``; ``μ`` a number or ``(B,)``/``(B, 1)``."""
    if isinstance(mu, Tensor) and mu.ndim == 2:
        mu = mu[:, 0]
    y1, y2 = y[:, 0], y[:, 1]
    return torch.stack([y2, mu * (1 - y1 * y1) * y2 - y1], 1)


def van_der_pol_numpy(t: float, y: np.ndarray, mu: float = 1.0) -> np.ndarray:
    return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def reference_trajectory(y0: Sequence[float], t_eval: np.ndarray, mu: float = 1.0, *,
                         rtol: float = 1e-11, atol: float = 1e-12) -> np.ndarray:
    """``y(t_eval)`` ``(T, 2)`` from ``y(t_eval[0]) = y0`` by ``solve_ivp`` (DOP853, tight tolerances)."""
    t_eval = np.asarray(t_eval, dtype=float)
    if t_eval.ndim != 1 or t_eval.size < 1 or np.any(np.diff(t_eval) < 0):
        raise ValueError("t_eval must be a non-empty increasing 1-D array")
    sol = __import__("scipy.integrate", fromlist=["solve_ivp"]).solve_ivp(
        van_der_pol_numpy, (t_eval[0], t_eval[-1]), np.asarray(y0, float), t_eval=t_eval, args=(mu,),
        method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    return sol.y.T


def reference_flow(y0s: np.ndarray, dts: np.ndarray, mus: np.ndarray | float = 1.0) -> np.ndarray:
    """``y(Δ)`` for each initial state ``y0s[k]`` at the offsets ``dts`` ``(T,)``: ``(K, T, 2)``."""
    y0s = np.asarray(y0s, float)
    mus = np.broadcast_to(np.asarray(mus, float), (len(y0s),))
    return np.stack([reference_trajectory(y0, dts, float(mu)) for y0, mu in zip(y0s, mus)])


def limit_cycle_extent(mu: float, *, t_settle: float = 40.0, y0: Sequence[float] = (0.0, 0.1)) -> tuple[float, float]:
    """``(max |y₁|, max |y₂|)`` of the Van der Pol trajectory from ``y0`` over ``t ∈ [0, t_settle]``
    by ``solve_ivp`` (the limit cycle's extent once settled; for μ ∈ [0.5, 2]: y₁ ≈ 2.0, y₂ from
    2.2 to 3.8). ``ValueError`` for a μ that is negative or not finite (no attracting cycle)."""
    if not (np.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu}")
    from scipy.integrate import solve_ivp

    sol = solve_ivp(van_der_pol_numpy, (0.0, t_settle), np.asarray(y0, float), args=(float(mu),),
                    method="DOP853", rtol=1e-8, atol=1e-10, dense_output=True)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    ext = np.abs(sol.sol(np.linspace(0.0, t_settle, int(100 * t_settle) + 1))).max(1)
    return float(ext[0]), float(ext[1])
