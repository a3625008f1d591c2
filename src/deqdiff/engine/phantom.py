"""Backward modes of a fixed point: exact implicit differentiation or phantom gradients.

* ``"exact"`` (default): every derivative, of every order, is an implicit linear solve with
  ``I − ∂f/∂z`` at z* (:mod:`deqdiff.engine.fixed_point`).
* :class:`PhantomGrad` (``"phantom"``): Geng, Zhang, Bai, Wang & Lin 2021 ("On training implicit
  models", NeurIPS, eq. 8–9). The forward solve finds z* without a graph; the output is then
  ``k`` damped unrolled steps from the detached z*,

      z₀ = z*,   z_{i+1} = (1 − τ) z_i + τ f(z_i, θ),   output z_k,

  and autograd differentiates those k steps. At an exact fixed point the value is z* and the
  first derivative is ``τ Σ_{i<k} ((1−τ)I + τJ)^i ∂f/∂θ``, the truncated Neumann series of the
  implicit ``(I − J)⁻¹ ∂f/∂θ``: it converges to the exact gradient as k → ∞ when the spectral
  radius of ``(1−τ)I + τJ`` is < 1, at the cost of k vector–Jacobian products instead of a
  linear solve.

Higher orders in phantom mode: the output is an ordinary autograd graph of k cell applications
from a constant z*, so ``create_graph=True``, ``torch.func`` and forward mode differentiate that
graph exactly. Those are derivatives of the *k-step map with z* held fixed*; they are not
approximations of the implicit higher derivatives (the k-step map's second derivative neglects
terms the implicit one has, and does not converge to it unless k → ∞). Use ``"exact"`` whenever
second or higher derivatives matter (Hessians, physics-informed losses).

When nothing requires a gradient (evaluation under ``no_grad``) the k steps are skipped and z*
is returned, so evaluation costs the same in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["PhantomGrad", "backward_mode", "BACKWARD_MODES"]

#: names accepted by ``fixed_point(grad=...)`` / ``DEQ(cell, grad=...)``
BACKWARD_MODES = ("exact", "phantom")


@dataclass(frozen=True)
class PhantomGrad:
    """Phantom gradient of Geng et al. 2021: ``steps`` = k ≥ 1 damped unrolled steps with
    damping ``damping`` = τ ∈ (0, 1] (τ = 1, k = 1 is the Jacobian-free backward of Fung et al.
    2022). Raises ``ValueError`` for other values."""

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"phantom steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.damping, (int, float)) or not 0.0 < float(self.damping) <= 1.0:
            raise ValueError(f"phantom damping must be in (0, 1], got {self.damping!r}")

    def unroll(self, f: Callable[..., Tensor], z_star: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        """``z_k`` of the damped iteration from the constant ``z_star`` (shape of z*)."""
        z = z_star.detach()
        if not _needs_graph(params):
            return z_star
        tau = float(self.damping)
        for _ in range(self.steps):
            fz = f(z, *params)
            z = fz if tau == 1.0 else (1.0 - tau) * z + tau * fz
        return z


def _needs_graph(params: tuple[Tensor, ...]) -> bool:
    """Whether any derivative can reach the params: autograd (grad mode and a param requiring
    grad), forward-mode AD or a torch.func transform (their tensors carry no ``requires_grad``
    but are wrapped), in which case the k steps must be recorded."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return True
    from torch._C._functorch import is_functorch_wrapped_tensor

    if any(is_functorch_wrapped_tensor(p) for p in params):
        return True
    import torch.autograd.forward_ad as fwAD

    return any(fwAD.unpack_dual(p).tangent is not None for p in params)


def backward_mode(grad: "str | PhantomGrad") -> PhantomGrad | None:
    """``None`` for exact implicit differentiation, else the :class:`PhantomGrad` policy.
    ``grad`` is ``"exact"``, ``"phantom"`` (default k and τ) or a ``PhantomGrad``."""
    if isinstance(grad, PhantomGrad):
        return grad
    if grad == "exact":
        return None
    if grad == "phantom":
        return PhantomGrad()
    raise ValueError(f"grad must be one of {BACKWARD_MODES} or a deqdiff.engine.PhantomGrad, got {grad!r}")
