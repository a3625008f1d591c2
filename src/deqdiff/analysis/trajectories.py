"""Solver trajectories of many inputs in a 2D PCA plane (Nguyen 2022, Figs. 4.2, 4.3; Nguyen 2022 §4.1.2).

The iterates z^[0], z^[1], … of the forward solve of every input are flattened to vectors,
a principal component analysis is fitted on all of them together (one plane per model /
checkpoint, as in Nguyen 2022), and each trajectory is drawn in that plane, coloured by class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from ._common import capture_equilibrium, no_deq_warnings, require_deq

__all__ = ["collect_trajectories", "pca_fit", "Projection", "project_trajectories", "trajectories_over_training"]


def collect_trajectories(model: nn.Module, x: Tensor, *, solver: str | None = None, tol: float = 0.0,
                         max_iter: int = 30, **overrides) -> Tensor:
    """Iterates of the model's forward solve: ``(K + 1, S, N)`` (k = 0 is the initial state; an
    input that converged early repeats its last iterate)."""
    require_deq(model, "collect_trajectories")
    opts = dict(tol=tol, max_iter=max_iter, on_fail="ignore", store_trajectory=True, **overrides)
    if solver is not None:
        opts["solver"] = solver
    with torch.no_grad(), no_deq_warnings():
        cap = capture_equilibrium(model, x, **opts)
    traj = cap.info.forward.trajectory
    if not traj:
        raise RuntimeError("the solver returned no trajectory (store_trajectory not honoured)")
    return torch.stack([z.reshape(z.shape[0], -1) for z in traj]).detach()


@dataclass
class Projection:
    """A PCA plane: ``mean (N,)``, ``components (2, N)`` and explained variance ratios."""

    mean: Tensor
    components: Tensor
    explained: Tensor

    def __call__(self, z: Tensor) -> Tensor:
        return (z - self.mean) @ self.components.T


def pca_fit(points: Tensor, n_components: int = 2) -> Projection:
    """PCA of ``points (M, N)`` by an SVD of the centred data; components are orthonormal rows,
    signs fixed (largest |loading| positive) so results are reproducible."""
    X = points.double()
    mean = X.mean(0)
    U, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    comps = Vh[:n_components]
    idx = comps.abs().argmax(1)
    signs = torch.sign(comps[torch.arange(comps.shape[0]), idx])
    comps = comps * signs[:, None]
    var = S**2
    return Projection(mean, comps, (var[:n_components] / var.sum().clamp_min(1e-300)))


def project_trajectories(traj: Tensor, n_components: int = 2) -> tuple[Tensor, Projection]:
    """Fit PCA on all iterates ``traj (K, S, N)`` and return coordinates ``(K, S, 2)``."""
    K, S, N = traj.shape
    proj = pca_fit(traj.reshape(K * S, N), n_components)
    return proj(traj.double().reshape(K * S, N)).reshape(K, S, n_components), proj


def trajectories_over_training(models: Mapping[str, nn.Module], x: Tensor, **kwargs) -> dict[str, dict]:
    """Nguyen 2022, Fig. 4.3: for each checkpoint (name → model) the PCA-projected trajectories
    ``coords (K, S, 2)``, the explained variance, and the mean step length per iteration."""
    out = {}
    for name, model in models.items():
        traj = collect_trajectories(model, x, **kwargs)
        coords, proj = project_trajectories(traj)
        steps = (traj[1:] - traj[:-1]).norm(dim=2).mean(1)
        out[name] = {"coords": coords, "explained": proj.explained, "mean_step": steps}
    return out
