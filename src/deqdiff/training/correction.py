"""Fixed-point correction (Bai, Geng, Savani & Kolter 2022, "Deep equilibrium optical flow
estimation", CVPR, §3.3): supervise intermediate solver iterates, not only the final state.

The forward solve is run once with its trajectory kept (``store_trajectory``); for each chosen
iteration ``k`` the model is evaluated again with the solver replaced by :class:`GivenIterate`,
which returns the stored iterate ``z_k`` instead of solving (``refresh=False``: the same dropout
masks and spectral-norm estimates as the main solve, so the same map). That output is
differentiated with the DEQ's own backward mode:

* ``grad="exact"``: the implicit-function rule applied at ``z_k`` — the gradient the exact mode
  gives a solve stopped after ``k`` iterations, ``(∂f/∂θ)ᵀ (I − J(z_k))⁻ᵀ ∂ℓ/∂z``;
* ``grad="phantom"``: ``k'`` damped steps from ``z_k`` (Geng et al. 2021), as in Bai et al. 2022.

The loss is ``ℓ(z_final) + Σ_i w_i ℓ(z_{k_i})`` with default weights ``w_i = γ^(n+1−i)``,
``γ = 0.8`` for iterates ``k_1 < … < k_n`` (the final state has weight 1; the exponential weights
of Teed & Deng 2020's sequence loss that Bai et al. 2022 use). An iteration beyond a sample's last
iterate takes that sample's final state (rows stop once converged).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..solvers.base import SolveInfo, Tracker, row_norm

__all__ = ["GivenIterate", "correction_weights", "correction_outputs", "outputs_at_iterates", "check_correction"]


class GivenIterate:
    """A forward "solver" that returns a given state ``(S, N)`` (one evaluation of the map to
    report its residual honestly; it is not a fixed point, so use it with ``on_fail="ignore"``)."""

    def __init__(self, state: Tensor):
        self.state = state.detach()

    def __call__(self, g: Callable[[Tensor], Tensor], z0: Tensor, *, tol: float, atol: float = 0.0,
                 max_iter: int = 1, scale: Tensor | None = None, store_trajectory: bool = False,
                 **options) -> tuple[Tensor, SolveInfo]:
        if self.state.shape != z0.shape:
            raise ValueError(f"GivenIterate: the stored state has shape {tuple(self.state.shape)}, "
                             f"the solve's state {tuple(z0.shape)}")
        z = self.state.to(dtype=z0.dtype, device=z0.device)
        track = Tracker(z, tol, atol, store_trajectory)
        gz = g(z)
        track.update(0, z, row_norm(gz - z), row_norm(gz) if scale is None else scale)
        return track.result, track.info("given_iterate", "forward")


def check_correction(iterations: Sequence[int], weights: Sequence[float] | None) -> tuple[list[int], list[float]]:
    """Validated ``(iterations, weights)``: iterations integers ≥ 1, strictly increasing; weights
    finite ≥ 0, one per iteration (default :func:`correction_weights`). Raises ``ValueError``."""
    its = list(iterations)
    if not its or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in its):
        raise ValueError(f"correction iterations must be integers >= 1, got {its}")
    if any(b <= a for a, b in zip(its, its[1:])):
        raise ValueError(f"correction iterations must be strictly increasing, got {its}")
    ws = correction_weights(len(its)) if weights is None else [float(w) for w in weights]
    if len(ws) != len(its):
        raise ValueError(f"{len(ws)} correction weights for {len(its)} iterations")
    if any(not torch.isfinite(torch.tensor(w)) or w < 0 for w in ws):
        raise ValueError(f"correction weights must be finite and >= 0, got {ws}")
    return its, ws


def correction_weights(n: int, gamma: float = 0.8) -> list[float]:
    """``[γ^n, …, γ^1]`` for n intermediate iterates (the final state has γ^0 = 1)."""
    return [gamma ** (n - i) for i in range(n)]


def outputs_at_iterates(model: nn.Module, inputs: Tensor, iterations: Sequence[int], **overrides) -> list[Tensor]:
    """The model's outputs at the iterates ``iterations`` of its last forward solve, which must
    have kept its trajectory (``model(inputs, store_trajectory=True)`` just before, same inputs).

    ``model`` follows deqdiff's protocol (``model.deq`` a ``deqdiff.DEQ``, ``model(x, **overrides)``
    passing overrides to it). Each output is differentiable with the DEQ's backward mode (module
    docstring). ``model.deq.last_info`` is left holding the main solve's statistics, without the
    trajectory (freed)."""
    deq = getattr(model, "deq", None)
    if deq is None:
        raise ValueError(f"{type(model).__name__} has no equilibrium layer (.deq); fixed-point correction needs a DEQ")
    info = deq.last_info
    trajectory = None if info is None or info.forward is None else info.forward.trajectory
    if not trajectory:
        raise RuntimeError("the last forward solve kept no trajectory; call model(x, store_trajectory=True) first")
    outs = []
    for k in iterations:
        state = trajectory[min(k, len(trajectory) - 1)]
        outs.append(model(inputs, solver=GivenIterate(state), refresh=False, on_fail="ignore", **overrides))
    info.forward.trajectory = None
    deq.last_info = info
    return outs


def correction_outputs(model: nn.Module, inputs: Tensor, iterations: Sequence[int], **overrides) -> tuple[Tensor, list[Tensor]]:
    """``(model(inputs), [model output at iterate k for k in iterations])`` (one forward solve)."""
    out = model(inputs, store_trajectory=True, **overrides)
    return out, outputs_at_iterates(model, inputs, iterations, **overrides)
