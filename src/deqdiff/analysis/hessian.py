"""Spectra of the loss Hessian of a DEQ model and of its two parts (Gauss–Newton and dynamics curvature), by Lanczos on the
matrix-free products of ``deqdiff.derivatives.LossHessian``:

    H = Zᵀ(∇²_z L)Z  [Gauss–Newton, Term A]  +  [I; Z]ᵀ ∇²_{(θ,z)} (λᵀf) [I; Z]  [dynamics, Term B]

with Z = dz*/dθ and λ the adjoint. θ is the equilibrium layer's parameters (the DEQ cell);
the layers before the DEQ (the injection, e.g. a stem) and after it (the head) are held
fixed, and L(z) = loss(head(z), y) is the model's loss as a function of the equilibrium only
(evaluated by running the model with its DEQ's output replaced by z). Each product costs two
implicit linear solves; nothing is unrolled.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..derivatives import LossHessian, hessian_eigenvalues
from ._common import (capture_equilibrium, param_dict, preserve_parameters, replace_equilibrium, require_deq,
                      standard_strides)

__all__ = ["deq_loss_hessian", "hessian_spectrum", "TERMS"]

TERMS = ("total", "gauss_newton", "dynamics")


def deq_loss_hessian(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], X: Tensor, Y: Tensor, *,
                     tol: float | None = None, max_iter_forward: int = 300, **solve_options) -> LossHessian:
    """The :class:`~deqdiff.derivatives.LossHessian` of ``loss_fn(model(X), Y)`` w.r.t. the
    parameters of the model's DEQ cell (a dict named like ``cell.named_parameters()``).
    ``tol`` of the implicit solves defaults to 1e-10 in float64 and 1e-5 otherwise."""
    deq = require_deq(model, "the DEQ loss Hessian")
    cell = deq.cell
    X = standard_strides(X)  # group norm's forward-mode rule needs row-major strides
    if tol is None:
        tol = 1e-10 if X.dtype == torch.float64 else 1e-5
    with torch.no_grad():  # z* to the derivative tolerance (models train with loose ones, e.g. 1e-2)
        cap = capture_equilibrium(model, X, tol=tol, max_iter=max_iter_forward, on_fail="ignore")
    z_star, xin = standard_strides(cap.z_star.detach()), standard_strides(cap.deq_input.detach())
    frozen = param_dict(model)
    theta = {n: p.detach() for n, p in cell.named_parameters()}

    def f(z, p, x):
        with preserve_parameters(cell):
            return functional_call(cell, p, (z, x))

    def loss(z):
        with replace_equilibrium(model, z), preserve_parameters(model):
            return loss_fn(functional_call(model, frozen, (X,)), Y)

    return LossHessian(f, z_star, (theta, xin), loss, argnums=0, batch_ndim=1, tol=tol, **solve_options)


def hessian_spectrum(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], X: Tensor, Y: Tensor, *,
                     k: int = 5, terms: Sequence[str] = TERMS, num_iters: int | None = None, seed: int = 0,
                     which: str = "largest", tol: float | None = None, **solve_options) -> dict:
    """The ``k`` largest (or smallest) eigenvalues of each Hessian term (Lanczos, ``num_iters``
    products of 2 solves each; default ``min(dim, max(2k + 20, 40))``). Returns
    ``{"dim", "loss", term: [eigenvalues]}``."""
    bad = [t for t in terms if t not in TERMS]
    if bad:
        raise ValueError(f"unknown Hessian terms {bad}; choose from {TERMS}")
    model_was_training = model.training
    model.eval()
    try:
        H = deq_loss_hessian(model, loss_fn, X, Y, tol=tol, **solve_options)
        out: dict = {"dim": H.dim, "loss": float(H.loss_value)}
        for t in terms:
            ev = hessian_eigenvalues(H, k=k, which=which, term=t, num_iters=num_iters, seed=seed)
            out[t] = [float(v) for v in ev]
        out["solves"] = len(H.solves)
    finally:
        model.train(model_was_training)
    return out
