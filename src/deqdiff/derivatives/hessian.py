"""The Hessian of a loss ``L(z*(θ))`` w.r.t. the parameters θ, split as in seed 000:

    H = Term A + Term B,
    Term A = Zᵀ (∇²_h L) Z                      (loss curvature, Gauss–Newton; Z = dh*/dθ)
    Term B = [I; Z]ᵀ ∇²_{(θ,h)} S [I; Z],  S(θ, h) = λᵀ f(h, θ) with λ fixed
                                                 (dynamics curvature)
    λᵀ = ∇_h Lᵀ (I − J)⁻¹                        (the adjoint, seed 000 §4.2)

Equivalently (seed 000, factored form) Term B = H^{(λ)}_{θθ} + Zᵀ H^{(λ)}_{hθ} + H^{(λ)}_{θh} Z +
Zᵀ H^{(λ)}_{hh} Z.

Costs (``Z v`` is one forward solve, ``Zᵀ w`` one adjoint solve; λ is one adjoint solve
made once in the constructor and reused by every product):

=====================  =====================================================  =========
product                formula                                                solves
=====================  =====================================================  =========
``gauss_newton_vp``    ``Zᵀ (∇²L (Z v))``                                      2
``dynamics_vp``        ``a_θ + Zᵀ a_h``, ``(a_h, a_θ) = ∇²S · (Z v, v)``       2
``hvp``                ``a_θ + Zᵀ (a_h + ∇²L (Z v))``                          2
``dense(term)``        the products on the ``P`` basis vectors, batched        2 (batched, P rhs)
=====================  =====================================================  =========

All products are matrix-free in θ (any pytree of tensors: a dict of module parameters, a
tuple of weights) and return plain tensors (no graph). For small rows (≤ 64 unknowns per
sample, the default ``solver="auto"``) every solve reuses one LU of ``I − J``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._problem import Equilibrium

__all__ = ["LossHessian"]

TERMS = ("total", "gauss_newton", "dynamics")


class LossHessian:
    """Hessian-vector products of ``θ ↦ loss(z*(θ))`` where ``z* = f(z*, *params)``.

    ``f(z, *params)``: the layer; ``z_star``: its fixed point at ``params`` (e.g. from
    ``deqdiff.fixed_point``); ``params``: a tuple of f's arguments (tensors or pytrees of
    tensors, e.g. ``(dict(cell.named_parameters()), x)``); ``loss(z) -> scalar``: a function
    of the equilibrium only (targets and other constants through a closure); ``argnums``:
    which arguments form θ (``torch.func`` style). Vectors ``v`` have the structure of
    ``params[argnums]``; ``flat_vp``/``dim`` give the flattened view (for Lanczos).

    Solve options: ``batch_ndim`` (leading dims of z* that index independent samples),
    ``solver``, ``tol`` (default 1e-10), ``atol``, ``max_iter``, ``on_fail``, ``options``.
    ``self.solves`` records every linear solve run (the constructor's λ is the first).
    """

    def __init__(self, f: Callable, z_star: Tensor, params: Sequence[Any], loss: Callable[[Tensor], Tensor],
                 argnums: int | Sequence[int] = 0, **solve_options):
        self.eq = Equilibrium(f, z_star, params, argnums, graph=False, **solve_options)
        self.tree = self.eq.tree
        self.loss = loss
        self.idx = self.tree.selected
        z = self.eq.z
        self.z_star = z
        self.loss_value, self.grad_h = _value_and_grad(loss, z)
        self.lam = self.eq.solve_T(self.grad_h)  # λ = (I − J)⁻ᵀ ∇_h L: 1 adjoint solve, cached

    @property
    def solves(self) -> list:
        return self.eq.solves

    @property
    def dim(self) -> int:
        """Number of scalar parameters in θ."""
        return self.tree.selected_numel

    # --- building blocks -----------------------------------------------------------------
    def _dots(self, v) -> list:
        return self.tree.tangent_leaves(v)

    def _loss_hvp(self, h_dot: Tensor) -> Tensor:
        """``∇²_h L · ḣ`` (no solve)."""
        return torch.func.jvp(torch.func.grad(self.loss), (self.z_star,), (h_dot,))[1]

    def _dynamics_parts(self, dots, zv):
        """``(a_h, a_θ) = ∇²_{(h,θ)} S · (Z v, v)``, S = λᵀ f (no solve)."""
        a_h, a_th = self.eq.f_second_vjp(self.lam, (zv, dots), self.idx)
        return a_h, a_th

    def _finish(self, dots, a_th: dict | None, w_h: Tensor):
        """``a_θ + Zᵀ w_h`` packed like θ (one adjoint solve)."""
        back = self.eq.z_cotangent(w_h, self.idx)
        vals = []
        for i, b in zip(self.idx, back):
            if a_th is not None and i in a_th:
                b = b + a_th[i]
            vals.append(b)
        return self.tree.pack(vals)

    def jacobian_vp(self, v) -> Tensor:
        """``Z v = dh*/dθ · v`` — 1 forward solve."""
        return self.eq.z_tangent(self._dots(v))

    def jacobian_tvp(self, w: Tensor):
        """``Zᵀ w`` — 1 adjoint solve."""
        return self.tree.pack(self.eq.z_cotangent(w, self.idx))

    # --- the products ----------------------------------------------------------------------
    def gauss_newton_vp(self, v):
        """Term A · v = ``Zᵀ ∇²_h L Z v`` — 2 solves (1 forward, 1 adjoint)."""
        dots = self._dots(v)
        zv = self.eq.z_tangent(dots)
        return self._finish(dots, None, self._loss_hvp(zv))

    def dynamics_vp(self, v):
        """Term B · v = ``[I; Z]ᵀ ∇²S [I; Z] v`` — 2 solves (1 forward, 1 adjoint; λ cached)."""
        dots = self._dots(v)
        zv = self.eq.z_tangent(dots)
        a_h, a_th = self._dynamics_parts(dots, zv)
        return self._finish(dots, a_th, a_h)

    def hvp(self, v):
        """(Term A + Term B) · v — 2 solves (1 forward, 1 adjoint; λ cached)."""
        dots = self._dots(v)
        zv = self.eq.z_tangent(dots)
        a_h, a_th = self._dynamics_parts(dots, zv)
        return self._finish(dots, a_th, a_h + self._loss_hvp(zv))

    def vp(self, v, term: str = "total"):
        """The product with ``term`` ∈ {"total", "gauss_newton", "dynamics"}."""
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS}, got {term!r}")
        return {"total": self.hvp, "gauss_newton": self.gauss_newton_vp, "dynamics": self.dynamics_vp}[term](v)

    # --- flat view ------------------------------------------------------------------------
    def flatten(self, v) -> Tensor:
        return self.tree.flatten_selected(v)

    def unflatten(self, vec: Tensor):
        return self.tree.unflatten_selected(vec)

    def flat_vp(self, vec: Tensor, term: str = "total") -> Tensor:
        """The product on a flat vector of length ``dim`` (or a stack ``(k, dim)``, batched
        by ``torch.func.vmap``: still 2 solves, each with k right-hand sides)."""
        if vec.ndim == 2:
            return torch.func.vmap(lambda u: self.flat_vp(u, term))(vec)
        return self.flatten(self.vp(self.unflatten(vec), term))

    def dense(self, term: str = "total") -> Tensor:
        """The ``(dim, dim)`` matrix of ``term`` (small problems): the products on the basis,
        batched — 2 solves with ``dim`` right-hand sides each."""
        like = self.tree.leaves[self.idx[0]]
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return self.flat_vp(eye, term).T  # column j = H e_j (rows of a symmetric H)


def _value_and_grad(loss: Callable, z: Tensor) -> tuple[Tensor, Tensor]:
    g, value = torch.func.grad_and_value(loss)(z)
    return value.detach(), g.detach()
