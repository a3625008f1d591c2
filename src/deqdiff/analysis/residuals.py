"""Convergence of the forward solve: relative residual curves (Nguyen 2022, eq. 4.2, Nguyen 2022 §4.1).

For an input x and solver iterates z^[k] the relative residual is

    r_k(x) = ‖f(z^[k], x) − z^[k]‖₂ / ‖f(z^[k], x)‖₂                                    (4.2)

— the quantity the engine's stopping rule tests, recorded per sample in
``SolveInfo.rel_trace``. :func:`residual_curves` runs a model's solve and returns these curves
(one per input, cut where the input converged); :func:`relative_residuals` recomputes (4.2)
from stored iterates (an independent check on the trace). :func:`compare_initializations`
repeats the experiment of Fig. 4.1: the same architecture with weights drawn from N(0, 1) and
from N(0, 0.01) (variance 0.01, std 0.1), under several solvers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._common import capture_equilibrium, no_deq_warnings, require_deq

__all__ = ["ResidualCurves", "residual_curves", "relative_residuals", "reinit_normal_", "compare_initializations"]


@dataclass
class ResidualCurves:
    """``rel[k, s]``: relative residual (4.2) of input ``s`` at iteration ``k`` (k = 0 is the
    initial state); NaN after the input converged. ``iterations[s]``: iterations it used."""

    rel: Tensor
    iterations: Tensor
    converged: Tensor
    solver: str
    label: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def held(self) -> Tensor:
        """Curves with each converged input holding its final value (for bands over inputs)."""
        out = self.rel.clone()
        for k in range(1, out.shape[0]):
            out[k] = torch.where(torch.isnan(out[k]), out[k - 1], out[k])
        return out

    def quantiles(self, q: Sequence[float] = (0.1, 0.5, 0.9)) -> Tensor:
        """``(len(q), K)`` quantiles over inputs of the held curves at every iteration."""
        held = self.held
        return torch.quantile(held, torch.tensor(q, dtype=held.dtype), dim=1)

    def to_dict(self, max_curves: int | None = None) -> dict:
        q = self.quantiles((0.1, 0.25, 0.5, 0.75, 0.9))
        rel = self.rel[:, :max_curves] if max_curves else self.rel
        return {
            "label": self.label, "solver": self.solver, "num_inputs": int(self.rel.shape[1]),
            "converged_fraction": float(self.converged.float().mean()),
            "iterations_median": float(self.iterations.double().median()),
            "final_rel_residual_median": float(self.held[-1].median()),
            "final_fraction_below_1e-3": float((self.held[-1] <= 1e-3).double().mean()),
            "quantiles": {name: _clean(q[i]) for i, name in enumerate(("q10", "q25", "median", "q75", "q90"))},
            "curves": [_clean(rel[:, s]) for s in range(rel.shape[1])],
            **self.meta,
        }


def _clean(t: Tensor) -> list:
    return [None if not math.isfinite(v) else float(v) for v in t.tolist()]


def residual_curves(model: nn.Module, x: Tensor, *, solver: str | None = None, tol: float = 0.0,
                    max_iter: int = 40, label: str = "", **overrides) -> ResidualCurves:
    """Relative residual curves (4.2) of ``model``'s forward solve on the inputs ``x``.

    ``tol=0`` (default) runs every input for ``max_iter`` iterations, so each curve shows the
    whole convergence; with ``tol > 0`` a curve ends (NaN) where its input met the tolerance.
    ``solver`` (default: the model's) and other ``overrides`` go to the solve."""
    deq = require_deq(model, "residual_curves")
    opts = dict(tol=tol, max_iter=max_iter, on_fail="ignore", **overrides)
    if solver is not None:
        opts["solver"] = solver
    with torch.no_grad(), no_deq_warnings():
        cap = capture_equilibrium(model, x, **opts)
    info = cap.info.forward
    rel = info.rel_trace.detach().clone()  # (K, S), k = 0 is z^[0]
    k = torch.arange(rel.shape[0], device=rel.device)[:, None]
    rel = torch.where(k > info.iterations[None, :], torch.full_like(rel, math.nan), rel)
    name = solver or deq.solver_options.get("solver", "anderson")
    name = name if isinstance(name, str) else getattr(name, "__name__", "custom")
    return ResidualCurves(rel.cpu(), info.iterations.cpu(), info.converged.cpu(), name, label or name,
                          meta={"tol": tol, "max_iter": max_iter})


def relative_residuals(f: Callable[..., Tensor], trajectory: Sequence[Tensor], *params) -> Tensor:
    """Eq. (4.2) computed from iterates: ``(K, S)`` with ``r[k, s] = ‖f(z_k)_s − z_k,s‖/‖f(z_k)_s‖``
    for states ``z_k`` of shape ``(S, …)`` and ``f(z, *params)``."""
    out = []
    with torch.no_grad():
        for z in trajectory:
            fz = f(z, *params)
            num = (fz - z).reshape(z.shape[0], -1).norm(dim=1)
            den = fz.reshape(z.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
            out.append(num / den)
    return torch.stack(out)


def reinit_normal_(module: nn.Module, std: float, *, seed: int = 0) -> nn.Module:
    """Redraw every weight of the equilibrium cell with at least 2 dims (convolutions, linear
    maps; not norms or biases) from N(0, std²), deterministically from ``seed``."""
    deq = require_deq(module, "reinit_normal_")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in deq.cell.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def compare_initializations(build: Callable[[], nn.Module], x: Tensor, *,
                            stds: Mapping[str, float] | None = None, solvers: Sequence[str] = ("anderson", "fixed_point"),
                            seed: int = 0, **kwargs) -> dict[str, ResidualCurves]:
    """Nguyen 2022, Fig. 4.1: residual curves of ``build()`` re-initialized from each N(0, std²) in
    ``stds`` (default N(0, 1) and N(0, 0.01)), for each solver. Keys ``"<init> / <solver>"``."""
    stds = {"N(0,1)": 1.0, "N(0,0.01)": 0.1} if stds is None else stds
    out = {}
    for init, std in stds.items():
        model = reinit_normal_(build(), std, seed=seed)
        for solver in solvers:
            key = f"{init} / {solver}"
            c = residual_curves(model, x, solver=solver, label=key, **kwargs)
            c.meta.update(init=init, std=std)
            out[key] = c
    return out
