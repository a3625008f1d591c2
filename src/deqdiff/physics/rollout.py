"""Long trajectories from a short-horizon flow map ``y(Δ; y0, c)`` applied repeatedly."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["rollout"]


@torch.no_grad()
def rollout(model: nn.Module, y0, t_end: float, *, cond=(), horizon: float | None = None,
            points_per_step: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Simulate ``t ∈ [0, t_end]`` from ``y0`` (``(n,)``) with steps of length ``horizon``
    (default ``model.horizon``): ``y_{k+1} = model([h, y_k, c])``. Returns ``(t, y)`` with
    ``points_per_step`` dense points per step (inside a step, ``Δ ∈ [0, h]``) — ``(T,)``, ``(T, n)``."""
    h = float(model.horizon if horizon is None else horizon)
    if not h > 0:
        raise ValueError(f"horizon must be positive, got {h}")
    if not t_end > 0:
        raise ValueError(f"t_end must be positive, got {t_end}")
    if points_per_step < 2:
        raise ValueError("points_per_step must be ≥ 2")
    p = next(iter(model.parameters()))
    y = torch.as_tensor(np.asarray(y0, float), dtype=p.dtype, device=p.device).reshape(1, -1)
    if not torch.isfinite(y).all():
        raise ValueError("y0 contains NaN or Inf")
    c = torch.as_tensor(np.asarray(cond, float), dtype=p.dtype, device=p.device).reshape(1, -1)
    n_steps = int(np.ceil(t_end / h - 1e-9))
    ts, ys = [np.zeros(1)], [y.cpu().numpy()]
    frac = torch.linspace(0, 1, points_per_step, dtype=p.dtype, device=p.device)[1:, None]
    for k in range(n_steps):
        hk = min(h, t_end - k * h)
        dts = frac * hk
        x = torch.cat([dts, y.expand(len(dts), -1), c.expand(len(dts), -1)], 1)
        yk = model(x)
        ts.append(k * h + dts[:, 0].cpu().numpy())
        ys.append(yk.cpu().numpy())
        y = yk[-1:]
    return np.concatenate(ts), np.concatenate(ys, 0)
