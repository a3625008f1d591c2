"""Extreme eigenvalues of a symmetric operator given only by its products — the spectrum of
the DEQ loss Hessian and of each of its terms (Term A: Gauss–Newton, Term B: dynamics curvature, total) — by
Lanczos with full reorthogonalization.

Each Lanczos step costs one product, i.e. 2 linear solves for a :class:`LossHessian` term
(λ is shared). With ``num_iters = dim`` and full reorthogonalization the Ritz values are the
whole spectrum (up to rounding); fewer iterations give the extreme eigenvalues first.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["lanczos", "eigsh", "hessian_eigenvalues"]


def lanczos(matvec: Callable[[Tensor], Tensor], dim: int, num_iters: int, *, seed: int = 0,
            dtype: torch.dtype = torch.float64, device=None, v0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run ``num_iters`` (≤ dim) Lanczos steps on the symmetric ``matvec`` (flat vectors of
    length ``dim``) from a seeded random start. Every new vector is orthogonalized twice
    against all previous ones (full reorthogonalization); on breakdown (an invariant
    subspace found) it restarts with a fresh random vector orthogonal to the basis.

    Returns ``(T, Q)``: the ``(k, k)`` tridiagonal matrix and the ``(k, dim)`` orthonormal
    basis with ``Q A Qᵀ = T``. Deterministic for a given ``seed``."""
    k = min(int(num_iters), dim)
    if k < 1:
        raise ValueError("num_iters must be >= 1")
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand():
        return torch.randn(dim, generator=gen, dtype=dtype).to(device)

    q = rand() if v0 is None else v0.detach().to(dtype=dtype, device=device).reshape(dim).clone()
    q = q / q.norm()
    Q = torch.zeros(k, dim, dtype=dtype, device=device)
    alpha = torch.zeros(k, dtype=dtype, device=device)
    beta = torch.zeros(max(k - 1, 0), dtype=dtype, device=device)
    scale = 0.0
    for j in range(k):
        Q[j] = q
        w = matvec(q).detach().reshape(dim).to(dtype)
        alpha[j] = q @ w
        for _ in range(2):  # full reorthogonalization (twice is enough)
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        if j == k - 1:
            break
        b = w.norm()
        scale = max(scale, float(alpha[j].abs()), float(b))
        if b <= 1e-12 * max(scale, 1e-300):  # invariant subspace: restart orthogonally
            beta[j] = 0.0
            w = rand()
            for _ in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            q = w / w.norm()
        else:
            beta[j] = b
            q = w / b
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T, Q


def eigsh(matvec: Callable[[Tensor], Tensor], dim: int, k: int = 6, which: str = "largest", *,
          num_iters: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64, device=None,
          return_eigenvectors: bool = False):
    """The ``k`` largest (``which="largest"``, descending) or smallest (``"smallest"``,
    ascending) eigenvalues of a symmetric operator by Lanczos (``num_iters`` defaults to
    ``min(dim, max(2k + 20, 40))``; ``num_iters = dim`` is exact up to rounding).
    With ``return_eigenvectors=True`` also the Ritz vectors ``(k, dim)`` (rows)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    k = min(k, dim)
    m = min(dim, max(2 * k + 20, 40)) if num_iters is None else min(num_iters, dim)
    T, Q = lanczos(matvec, dim, m, seed=seed, dtype=dtype, device=device)
    vals, vecs = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=(which == "largest"))[:k]
    vals = vals[order]
    if return_eigenvectors:
        return vals, (Q.T @ vecs[:, order]).T
    return vals


def hessian_eigenvalues(hessian, k: int = 6, which: str = "largest", term: str = "total", *,
                        num_iters: int | None = None, seed: int = 0, return_eigenvectors: bool = False):
    """Extreme eigenvalues of a :class:`~deqdiff.derivatives.LossHessian` term
    (``"total"``, ``"gauss_newton"`` = Term A, ``"dynamics"`` = Term B) by :func:`eigsh`.
    Cost: ``num_iters`` products, 2 linear solves each (plus λ, already cached)."""
    like = hessian.tree.leaves[hessian.idx[0]]
    return eigsh(lambda v: hessian.flat_vp(v, term), hessian.dim, k, which, num_iters=num_iters, seed=seed,
                 dtype=like.dtype, device=like.device, return_eigenvectors=return_eigenvectors)
