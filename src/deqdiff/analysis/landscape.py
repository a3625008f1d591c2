"""Loss landscapes along filter-normalized random directions (Li et al. 2018; Nguyen 2022 §4.2).

    Φ(α) = L(θ* + α d₁),     Φ(α, β) = L(θ* + α d₁ + β d₂)

around trained parameters θ*. Each direction is drawn from N(0, I) and **filter-normalized**:
for every parameter tensor w with ≥ 2 dims and each of its filters w_i (slices along dim 0: a
convolution's output channel, a linear map's output neuron / row),

    d_i ← d_i · ‖w_i‖ / ‖d_i‖,

so every filter of d has the norm of the matching filter of θ* (invariant to the per-filter
rescalings of Dinh et al. 2017). Tensors with ≤ 1 dim (biases, group/batch-norm scales and
shifts) are handled as in Li et al.'s ``--xignore biasbn`` (their recommended setting):
their direction is **zero** (``ignore="biasbn"``, default); ``ignore="copy"`` instead sets
d = w as their code does without the flag. Buffers (e.g. batch-norm running statistics) are
never perturbed.

The grid is evaluated in batches of parameter sets: ``torch.func.vmap`` over stacked parameter
sets through ``functional_call``, so a batch of g grid points is one forward pass (for a DEQ,
one fixed-point solve with g·S independent rows), not g separate Python loops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._common import no_deq_warnings, param_dict, preserve_parameters, standard_strides

__all__ = ["filter_normalize", "random_direction", "random_directions", "evaluate_grid", "Landscape",
           "landscape_1d", "landscape_2d", "flatness_summary"]

IGNORE = ("biasbn", "copy")


def filter_normalize(direction: Mapping[str, Tensor], weights: Mapping[str, Tensor], *,
                     ignore: str = "biasbn", eps: float = 1e-10) -> dict[str, Tensor]:
    """Filter-wise normalization of ``direction`` to ``weights`` (module docstring)."""
    if ignore not in IGNORE:
        raise ValueError(f"ignore must be one of {IGNORE}, got {ignore!r}")
    out = {}
    for name, w in weights.items():
        d = direction[name]
        if d.shape != w.shape:
            raise ValueError(f"direction {name} has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
        if w.ndim <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        wf, df = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)
        scale = wf.norm(dim=1) / (df.norm(dim=1) + eps)
        out[name] = (df * scale[:, None]).reshape(w.shape)
    return out


def random_direction(weights: Mapping[str, Tensor], generator: torch.Generator, *, ignore: str = "biasbn") -> dict:
    """One filter-normalized Gaussian direction for ``weights`` (drawn on the CPU from
    ``generator``, so it does not depend on the device)."""
    raw = {k: torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype).to(w.device)
           for k, w in weights.items()}
    return filter_normalize(raw, weights, ignore=ignore)


def random_directions(model: nn.Module, n: int = 2, *, seed: int = 0, names: Sequence[str] | None = None,
                      ignore: str = "biasbn") -> list[dict[str, Tensor]]:
    """``n`` filter-normalized directions for the model's trainable parameters (deterministic
    in ``seed``)."""
    weights = param_dict(model, names)
    gen = torch.Generator().manual_seed(seed)
    return [random_direction(weights, gen, ignore=ignore) for _ in range(n)]


def _classification(Y: Tensor) -> bool:
    return not Y.is_floating_point()


def evaluate_grid(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], X: Tensor, Y: Tensor,
                  directions: Sequence[Mapping[str, Tensor]], coords: Tensor, *, points_per_batch: int = 32,
                  samples_per_batch: int | None = None, progress: Callable | None = None,
                  **overrides) -> tuple[Tensor, Tensor | None, int]:
    """Loss (and accuracy, for integer labels) at ``θ* + Σ_i coords[:, i] d_i`` for every row of
    ``coords (G, n)``. ``loss_fn(outputs, Y)`` must average over samples. Returns
    ``(loss (G,), accuracy (G,) | None, number of solver non-convergence warnings)``."""
    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise ValueError(f"coords must be (G, {len(directions)}), got {tuple(coords.shape)}")
    p0 = param_dict(model, list(directions[0]))
    dirs = {k: torch.stack([d[k] for d in directions]) for k in p0}  # (n, *shape)
    model_was_training = model.training
    model.eval()
    X = standard_strides(X)
    S = X.shape[0]
    sb = S if samples_per_batch is None else samples_per_batch
    losses, accs, warned = [], [], 0

    def outputs(q, xb):
        return functional_call(model, q, (xb,), overrides)

    batched = vmap(outputs, in_dims=(0, None))
    starts = range(0, coords.shape[0], points_per_batch)
    try:
        with torch.no_grad(), no_deq_warnings() as caught, preserve_parameters(model):
            for s in (progress(starts) if progress else starts):
                c = coords[s:s + points_per_batch].to(dtype=next(iter(p0.values())).dtype)
                q = {k: p0[k] + torch.tensordot(c, dirs[k], dims=1) for k in p0}
                tot_loss = torch.zeros(c.shape[0], dtype=torch.float64)
                correct = torch.zeros(c.shape[0], dtype=torch.float64)
                for b in range(0, S, sb):
                    xb, yb = X[b:b + sb], Y[b:b + sb]
                    out = batched(q, xb)  # (g, s, …)
                    tot_loss += vmap(loss_fn, in_dims=(0, None))(out, yb).double().cpu() * xb.shape[0]
                    if _classification(Y):
                        correct += (out.argmax(-1) == yb).double().sum(-1).cpu()
                losses.append(tot_loss / S)
                accs.append(correct / S)
        warned = len(caught)
    finally:
        model.train(model_was_training)
    return torch.cat(losses), (torch.cat(accs) if _classification(Y) else None), warned


@dataclass
class Landscape:
    """A 1D (``betas`` is None) or 2D landscape: ``loss[i, j] = Φ(alphas[i], betas[j])``."""

    alphas: Tensor
    betas: Tensor | None
    loss: Tensor
    accuracy: Tensor | None
    center_loss: float
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"alphas": self.alphas.tolist(), "betas": None if self.betas is None else self.betas.tolist(),
             "loss": self.loss.tolist(), "accuracy": None if self.accuracy is None else self.accuracy.tolist(),
             "center_loss": self.center_loss, **self.meta}
        d["flatness"] = flatness_summary(self)
        return d


def _grid(span: tuple[float, float], steps: int) -> Tensor:
    if steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps must be odd and >= 3 (so the grid contains the centre), got {steps}")
    return torch.linspace(span[0], span[1], steps, dtype=torch.float64)


def landscape_1d(model: nn.Module, loss_fn: Callable, X: Tensor, Y: Tensor, *, seed: int = 0, steps: int = 51,
                 span: tuple[float, float] = (-1.0, 1.0), ignore: str = "biasbn", direction=None, **kwargs) -> Landscape:
    """Φ(α) on ``steps`` points of ``span`` along one filter-normalized direction."""
    t0 = time.perf_counter()
    a = _grid(span, steps)
    d = random_directions(model, 1, seed=seed, ignore=ignore) if direction is None else [direction]
    loss, acc, warned = evaluate_grid(model, loss_fn, X, Y, d, a[:, None], **kwargs)
    return Landscape(a, None, loss, acc, float(loss[steps // 2]),
                     {"seed": seed, "ignore": ignore, "num_samples": int(X.shape[0]), "grid": [steps],
                      "seconds": time.perf_counter() - t0, "convergence_warnings": warned})


def landscape_2d(model: nn.Module, loss_fn: Callable, X: Tensor, Y: Tensor, *, seed: int = 0, steps: int = 51,
                 span: tuple[float, float] = (-1.0, 1.0), ignore: str = "biasbn", directions=None, **kwargs) -> Landscape:
    """Φ(α, β) on a ``steps × steps`` grid of ``span²`` along two filter-normalized directions
    (Nguyen 2022's default: [−1, 1]² at 51 × 51)."""
    t0 = time.perf_counter()
    a = _grid(span, steps)
    ds = random_directions(model, 2, seed=seed, ignore=ignore) if directions is None else list(directions)
    A, B = torch.meshgrid(a, a, indexing="ij")
    coords = torch.stack([A.reshape(-1), B.reshape(-1)], dim=1)
    loss, acc, warned = evaluate_grid(model, loss_fn, X, Y, ds, coords, **kwargs)
    loss = loss.reshape(steps, steps)
    acc = None if acc is None else acc.reshape(steps, steps)
    return Landscape(a, a.clone(), loss, acc, float(loss[steps // 2, steps // 2]),
                     {"seed": seed, "ignore": ignore, "num_samples": int(X.shape[0]), "grid": [steps, steps],
                      "seconds": time.perf_counter() - t0, "convergence_warnings": warned})


def flatness_summary(land: Landscape, *, deltas: Sequence[float] = (0.1, 0.5, 1.0),
                     radii: Sequence[float] = (0.25, 0.5, 1.0)) -> dict:
    """Numbers that compare minima (larger area / smaller sharpness = flatter):

    * ``area_below[δ]``: fraction of the plotted square (or segment) with Φ ≤ Φ(0) + δ;
    * ``sharpness[r]``: max of Φ − Φ(0) over the grid points with max(|α|, |β|) ≤ r;
    * ``curvature``: central second difference of Φ at 0 along each axis (grid spacing h)."""
    L = land.loss
    c = land.center_loss
    a = land.alphas
    if land.betas is None:
        box = a.abs()
        mid, h = L.shape[0] // 2, float(a[1] - a[0])
        curv = [float((L[mid + 1] - 2 * L[mid] + L[mid - 1]) / h**2)]
    else:
        A, B = torch.meshgrid(a, land.betas, indexing="ij")
        box = torch.maximum(A.abs(), B.abs())
        mid, h = L.shape[0] // 2, float(a[1] - a[0])
        curv = [float((L[mid + 1, mid] - 2 * L[mid, mid] + L[mid - 1, mid]) / h**2),
                float((L[mid, mid + 1] - 2 * L[mid, mid] + L[mid, mid - 1]) / h**2)]
    finite = torch.isfinite(L)
    out = {
        "center_loss": c, "min_loss": float(L[finite].min()) if finite.any() else math.nan,
        "max_loss": float(L[finite].max()) if finite.any() else math.nan,
        "area_below": {str(d): float(((L <= c + d) & finite).double().mean()) for d in deltas},
        "sharpness": {str(r): float((L[(box <= r + 1e-12) & finite] - c).max()) for r in radii},
        "curvature": curv,
    }
    return out
