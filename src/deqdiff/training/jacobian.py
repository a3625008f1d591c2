"""Jacobian regularization of DEQs (Bai, Koltun & Kolter 2021, "Stabilizing equilibrium models
by Jacobian regularization").

Hutchinson: for ε ~ N(0, I), E‖εᵀ J‖² = tr(JᵀJ) = ‖J‖_F², so with J = ∂f/∂z at the equilibrium
(one block per sample, the samples being independent) one vector–Jacobian product per random
vector gives an unbiased estimate of every sample's ‖J_f‖_F². As in Bai et al., z* enters as a
constant (detached) while ``x`` and the cell parameters keep their graph, and the penalty is
normalized by the state size N: ρ = ‖J_f‖_F²/N.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["hutchinson_frobenius", "capture_equilibrium"]


def hutchinson_frobenius(f: Callable[[Tensor, Tensor], Tensor], z: Tensor, x: Tensor, *, samples: int = 1,
                         create_graph: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample unbiased estimate ``(B,)`` of ‖∂f/∂z (z, x)‖_F² from ``samples`` Gaussian vectors
    (batch dim 0; ``create_graph`` keeps it differentiable w.r.t. ``x`` and f's parameters)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    z = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z, x)
        total = fz.new_zeros(fz.shape[0])
        for i in range(samples):
            eps = torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator)
            (vjp,) = torch.autograd.grad(fz, z, eps, create_graph=create_graph, retain_graph=i < samples - 1 or create_graph)
            total = total + vjp.pow(2).flatten(1).sum(1)
    return total / samples


@contextmanager
def capture_equilibrium(model: nn.Module):
    """Within the block, ``box["x"]``/``box["z"]`` hold the input and output of ``model.deq``'s
    last call (the injected input and z*)."""
    deq = getattr(model, "deq", None)
    if deq is None:
        raise ValueError(f"{type(model).__name__} has no equilibrium layer (.deq); Jacobian regularization needs a DEQ model")
    box: dict[str, Tensor] = {}

    def hook(module, args, output):
        box["x"], box["z"] = args[0], output

    handle = deq.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
