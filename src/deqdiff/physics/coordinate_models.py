"""Models of fields ``u(X)`` over a box of physical coordinates ``X`` ``(B, d)``: the inputs are
scaled to ``[−1, 1]^d`` (``features``), so one initialization serves every domain.

* :class:`CoordinatePIDEQ` — the PIDEQ (Pacheco & Camponogara 2024, "Physics-informed deep
  equilibrium models") on scaled coordinates: ``u = C z* + D φ(X) + c``,
  ``z* = tanh(A z* + U φ(X) + b)``; ``mode="implicit"`` gives :mod:`.fields` its implicit
  engine (``deq``, ``features``, ``readout``), ``mode="unrolled"`` iterates with autograd
  recording (the baseline whose derivatives backpropagate through every iteration).
* :class:`CoordinateMLP` — the explicit tanh PINN baseline (Raissi, Perdikaris & Karniadakis 2019).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .models import MLP, PIDEQ, TanhCell

__all__ = ["CoordinatePIDEQ", "CoordinateMLP", "ScaledInputs", "FusedTanhCell", "mlp_width_for"]


class ScaledInputs(nn.Module):
    """``φ(X) = 2 (X − low) / (high − low) − 1`` per coordinate (buffers, saved in checkpoints)."""

    def __init__(self, low: Sequence[float], high: Sequence[float]):
        super().__init__()
        low_t, high_t = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
        if low_t.shape != high_t.shape or low_t.ndim != 1 or not bool((high_t > low_t).all()):
            raise ValueError(f"need low < high per coordinate, got low={list(low)}, high={list(high)}")
        scale = 2.0 / (high_t - low_t)
        # φ(X) = X diag(scale) + shift as one fused addmm: broadcasting arithmetic runs through
        # slow Python decompositions under forward-mode AD (nested jvp of the implicit engine)
        self.register_buffer("diag", torch.diag(scale).to(torch.get_default_dtype()))
        self.register_buffer("shift", (-low_t * scale - 1.0).to(torch.get_default_dtype()))

    def forward(self, X: Tensor) -> Tensor:
        return torch.addmm(self.shift, X, self.diag)


class FusedTanhCell(TanhCell):
    """:class:`~deqdiff.physics.models.TanhCell` with its affine map as fused ``addmm`` calls
    (same values; much faster under nested forward-mode AD)."""

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(torch.addmm(torch.addmm(self.b, x, self.U.T), z, self.weight().T))


class CoordinatePIDEQ(PIDEQ):
    """``u(X) = C z* + D φ(X) + c`` with ``z* = tanh(A z* + U φ(X) + b)`` (module docstring).

    ``bounds``: ``[(low, high), …]`` per coordinate. Initialization: ``‖A‖₂ = rho`` (a
    contraction), ``U ~ input_scale·N(0, 1/d)``, ``b ~ bias_scale·N(0, 1)``. Other keywords
    as :class:`~deqdiff.physics.PIDEQ` (``solver``, ``tol``, ``max_iter``, ``mode`` …)."""

    def __init__(self, bounds: Sequence[tuple[float, float]], out_features: int = 1, width: int = 24, *,
                 input_scale: float = 2.0, bias_scale: float = 0.5, **kwargs):
        d = len(bounds)
        super().__init__(d, out_features, width, input_scale=input_scale, **kwargs)
        self.inputs = ScaledInputs([b[0] for b in bounds], [b[1] for b in bounds])
        old = self.deq.cell
        fused = FusedTanhCell(old.width, old.in_features, max_norm=old.max_norm, spectral_norm=old.spectral_norm)
        fused.load_state_dict(old.state_dict())
        self.deq.cell = fused
        with torch.no_grad():
            self.cell.b.normal_(0.0, bias_scale)

    def features(self, X: Tensor) -> Tensor:
        return self.inputs(X)

    def readout(self, z: Tensor, phi: Tensor) -> Tensor:
        y = self.C(z)
        return y + self.D(phi) if self.D is not None else y

    def forward(self, X: Tensor, **overrides) -> Tensor:
        return super().forward(self.features(X), **overrides)


class CoordinateMLP(nn.Module):
    """Explicit PINN ``u(X) = MLP(φ(X))``: ``depth`` tanh layers of ``width`` units."""

    mode = "explicit"

    def __init__(self, bounds: Sequence[tuple[float, float]], out_features: int = 1, width: int = 20, depth: int = 4):
        super().__init__()
        self.inputs = ScaledInputs([b[0] for b in bounds], [b[1] for b in bounds])
        self.net = MLP(len(bounds), out_features, width, depth)
        self.in_features, self.out_features = len(bounds), out_features

    def forward(self, X: Tensor, **_) -> Tensor:
        return self.net(self.inputs(X))


def mlp_width_for(n_params: int, d_in: int, d_out: int, depth: int) -> int:
    """The width whose ``depth``-layer tanh MLP has the parameter count closest to ``n_params``."""
    count = lambda w: d_in * w + w + (depth - 1) * (w * w + w) + w * d_out + d_out  # noqa: E731
    return min(range(1, 4 * int(math.sqrt(n_params)) + 8), key=lambda w: abs(count(w) - n_params))
