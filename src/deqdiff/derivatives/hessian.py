"""The Hessian of a loss ``L(z*(θ))`` w.r.t. the parameters θ, split into a loss-curvature
(Gauss–Newton) term and a dynamics-curvature term:

    H = Term A + Term B,
    Term A = Zᵀ (∇²_h L) Z                      (loss curvature, Gauss–Newton; Z = dh*/dθ)
    Term B = [I; Z]ᵀ ∇²_{(θ,h)} S [I; Z],  S(θ, h) = λᵀ f(h, θ) with λ fixed
                                                 (dynamics curvature)
    λᵀ = ∇_h Lᵀ (I − J)⁻¹                        (the adjoint; second-order adjoint method, Wang et al. 1992)

Equivalently (factored form) Term B = H^{(λ)}_{θθ} + Zᵀ H^{(λ)}_{hθ} + H^{(λ)}_{θh} Z +
Zᵀ H^{(λ)}_{hh} Z.

**Head on (z*, φ).** With ``head`` the loss is ``ℓ(y)``, ``y = head(h*, *head_params)``, and θ
is extended by the head's parameters φ (e.g. a linear classifier ``y = C h* + c``). With
``K = [Z 0; 0 I]`` (the Jacobian of (h*, φ) w.r.t. (θ, φ)) and ``J_y = ∂y/∂(h, φ) K``:

    H = J_yᵀ ∇²ℓ J_y                                  "gauss_newton" (PSD for convex ℓ)
      + [I; Z]ᵀ ∇²_{(θ,h)} S [I; Z]  (θ-block only)    "dynamics", λ = (I − J)⁻ᵀ (∂y/∂h)ᵀ ∇ℓ
      + Kᵀ (Σ_i ∂ℓ/∂y_i ∇²_{(h,φ)} y_i) K              "head" (zero without a head)

Term A for ``L(h, φ) = ℓ(head(h, φ))`` is ``gauss_newton + head``; without a head (``y = h``)
Term A is the Gauss–Newton matrix (Schraudolph 2002) and the split is exactly A + B.

Costs (``Z v`` is one forward solve, ``Zᵀ w`` one adjoint solve; λ is one adjoint solve
made once in the constructor and reused by every product):

=====================  =====================================================  =========
product                formula                                                solves
=====================  =====================================================  =========
``gauss_newton_vp``    ``Zᵀ (∇²L (Z v))``                                      2
``dynamics_vp``        ``a_θ + Zᵀ a_h``, ``(a_h, a_θ) = ∇²S · (Z v, v)``       2
``head_vp``            ``Kᵀ Σ_i ∂ℓ/∂y_i ∇²y_i K v``                            2
``hvp``                ``a_θ + Zᵀ (a_h + ∇²L (Z v))`` (+ head parts)           2
``dense(term)``        the products on the ``P`` basis vectors, batched        2 (batched, P rhs)
=====================  =====================================================  =========

All products are matrix-free in θ (any pytree of tensors: a dict of module parameters, a
tuple of weights). By default they return plain tensors; with ``create_graph=True`` they
keep their graph w.r.t. ``params``, ``head_params`` and ``v`` (z*, λ and every solve are
engine nodes, so a further ``torch.autograd.grad`` runs further implicit solves: third
derivatives of the loss, gradients of a curvature penalty). For small rows (≤ 64 unknowns
per sample, the default ``solver="auto"``) every solve reuses one LU of ``I − J``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from torch.utils._pytree import tree_map

from ..engine.functional import hvp_by_vjp
from ._problem import Equilibrium, ParamTree

__all__ = ["LossHessian"]

TERMS = ("total", "gauss_newton", "dynamics", "head")


class LossHessian:
    """Hessian-vector products of ``θ ↦ loss(z*(θ))`` (or ``(θ, φ) ↦ loss(head(z*(θ), *φ))``)
    where ``z* = f(z*, *params)``.

    ``f(z, *params)``: the layer; ``z_star``: its fixed point at ``params`` (e.g. from
    ``deqdiff.fixed_point``); ``params``: a tuple of f's arguments (tensors or pytrees of
    tensors, e.g. ``(dict(cell.named_parameters()), x)``); ``loss``: ``loss(z) -> scalar``,
    or ``loss(y) -> scalar`` with ``head`` (targets and other constants through a closure);
    ``argnums``: which arguments form θ (``torch.func`` style).

    ``head(z, *head_params) -> y``: an optional output network whose parameters
    ``head_params`` (a tuple of tensors or pytrees) are all differentiated. Vectors ``v``
    have the structure of ``params[argnums]`` without a head and ``(v_θ, v_φ)`` with one
    (``v_φ`` a tuple like ``head_params``); ``flat_vp``/``dim`` give the flattened view.

    ``create_graph``: keep the products' graph (see the module docstring).
    Solve options: ``batch_ndim`` (leading dims of z* that index independent samples),
    ``solver``, ``tol`` (default 1e-10 in float64), ``atol``, ``max_iter``, ``on_fail``,
    ``options``, ``z_tol`` (acceptance of the given z*). ``self.solves`` records every
    linear solve run (the constructor's λ is the first).
    """

    def __init__(self, f: Callable, z_star: Tensor, params: Sequence[Any], loss: Callable[[Tensor], Tensor],
                 argnums: int | Sequence[int] = 0, *, head: Callable | None = None,
                 head_params: Sequence[Any] = (), create_graph: bool = False, **solve_options):
        if head is None and len(tuple(head_params)):
            raise ValueError("head_params given without a head")
        self.create_graph = create_graph
        self.eq = Equilibrium(f, z_star, params, argnums, graph=create_graph, **solve_options)
        self.tree = self.eq.tree
        self.has_head = head is not None
        self.head_tree = ParamTree(tuple(head_params), tuple(range(len(tuple(head_params)))))
        self.phi = self.head_tree.leaves if create_graph else tuple(p.detach() for p in self.head_tree.leaves)
        self._head = (lambda z, *phi: z) if head is None else self.head_tree.flat_f(head)
        self.loss = loss
        self.idx = self.tree.selected
        z = self.z_star = self.eq.z
        y, pull_y = torch.func.vjp(lambda h: self._head(h, *self.phi), z)
        self.y = y
        g_y, value = torch.func.grad_and_value(loss)(y)
        self.grad_y = g_y
        (self.grad_h,) = pull_y(g_y)  # ∇_h L = (∂y/∂h)ᵀ ∇ℓ
        self.loss_value = value
        self.lam = self.eq.solve_T(self.grad_h)  # λ = (I − J)⁻ᵀ ∇_h L: 1 adjoint solve, cached
        if not create_graph:
            self.loss_value, self.grad_y, self.grad_h, self.lam, self.y = (
                t.detach() for t in (value, g_y, self.grad_h, self.lam, y))

    @property
    def solves(self) -> list:
        return self.eq.solves

    @property
    def dim(self) -> int:
        """Number of scalar parameters in θ (and φ)."""
        return self.tree.selected_numel + self.head_tree.selected_numel

    # --- building blocks -----------------------------------------------------------------
    def _split(self, v):
        """``v`` → (leaf-aligned θ tangents, list of φ tangents)."""
        if not self.has_head:
            return self.tree.tangent_leaves(v), []
        msg = "with a head, v must be a pair (v_params, v_head_params): v_params like params[argnums], " \
              "v_head_params a tuple like head_params"
        if not isinstance(v, (tuple, list)) or len(v) != 2 or not isinstance(v[1], (tuple, list)):
            raise ValueError(msg)
        v_th, v_phi = v
        try:
            phi = [t if t is not None else torch.zeros_like(p)
                   for t, p in zip(self.head_tree.tangent_leaves(tuple(v_phi)), self.phi)]
            return self.tree.tangent_leaves(v_th), phi
        except ValueError as err:
            raise ValueError(f"{msg} ({err})") from None

    def _head_parts(self, zv: Tensor, phi_dots: list, gn: bool, curv: bool):
        """``(w_h, w_φ)``: the head's contribution to ``Kᵀ(·)`` — the Gauss–Newton part
        ``J_yᵀ ∇²ℓ J_y`` and/or the head-curvature part ``Σ ∂ℓ/∂y_i ∇²y_i`` applied to
        ``(Z v, v_φ)`` (no solve)."""
        primals = (self.z_star, *self.phi)
        tangents = (zv, *phi_dots)
        w_h = torch.zeros_like(self.z_star)
        w_phi = [torch.zeros_like(p) for p in self.phi]

        def add(parts):
            nonlocal w_h
            w_h = w_h + parts[0]
            for k, g in enumerate(parts[1:]):
                w_phi[k] = w_phi[k] + g

        def y_dot_of(*p):
            return torch.func.jvp(self._head, p, tangents)[1]

        if gn:
            y_dot = y_dot_of(*primals)
            u = torch.func.jvp(torch.func.grad(self.loss), (self.y,), (y_dot,))[1]  # ∇²ℓ J_y v
            _, pull = torch.func.vjp(self._head, *primals)
            add(pull(u))
        if curv and self.has_head:
            # ∇_{(h,φ)} ⟨∇ℓ, D y[(Zv, v_φ)]⟩, reverse over reverse (engine.functional.hvp_by_vjp)
            add(hvp_by_vjp(self._head, primals, self.grad_y, tangents))
        return w_h, w_phi

    def _product(self, v, gn: bool, dyn: bool, curv: bool):
        """``Kᵀ(...)`` of the selected terms — 2 solves: ``Z v`` and one ``Zᵀ``."""
        dots, phi_dots = self._split(v)
        zv = self.eq.z_tangent(dots)
        w_h, w_phi = self._head_parts(zv, phi_dots, gn, curv)
        a_th = None
        if dyn:
            a_h, a_th = self.eq.f_second_vjp(self.lam, (zv, dots), self.idx)
            w_h = w_h + a_h
        back = self.eq.z_cotangent(w_h, self.idx)
        vals = [b + a_th[i] if a_th is not None and i in a_th else b for i, b in zip(self.idx, back)]
        out = self.tree.pack(vals)
        if self.has_head:
            out = (out, tuple(self.head_tree.unflatten(w_phi)))
        return out if self.create_graph else _detach(out)

    def jacobian_vp(self, v) -> Tensor:
        """``Z v = dh*/dθ · v`` (the θ part of ``v``) — 1 forward solve."""
        return self.eq.z_tangent(self._split(v)[0])

    def jacobian_tvp(self, w: Tensor):
        """``Zᵀ w`` (structure of ``params[argnums]``) — 1 adjoint solve."""
        return self.tree.pack(self.eq.z_cotangent(w, self.idx))

    # --- the products ----------------------------------------------------------------------
    def gauss_newton_vp(self, v):
        """Term A · v = ``J_yᵀ ∇²ℓ J_y v`` (``Zᵀ ∇²_h L Z v`` without a head) — 2 solves."""
        return self._product(v, gn=True, dyn=False, curv=False)

    def dynamics_vp(self, v):
        """Term B · v = ``[I; Z]ᵀ ∇²S [I; Z] v`` — 2 solves (1 forward, 1 adjoint; λ cached)."""
        return self._product(v, gn=False, dyn=True, curv=False)

    def head_vp(self, v):
        """Head curvature · v = ``Kᵀ Σ_i ∂ℓ/∂y_i ∇²y_i K v`` (zero without a head) — 2 solves."""
        return self._product(v, gn=False, dyn=False, curv=True)

    def hvp(self, v):
        """Total Hessian · v (sum of the terms) — 2 solves (1 forward, 1 adjoint; λ cached)."""
        return self._product(v, gn=True, dyn=True, curv=True)

    def vp(self, v, term: str = "total"):
        """The product with ``term`` ∈ {"total", "gauss_newton", "dynamics", "head"}."""
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS}, got {term!r}")
        return {"total": self.hvp, "gauss_newton": self.gauss_newton_vp, "dynamics": self.dynamics_vp,
                "head": self.head_vp}[term](v)

    # --- flat view ------------------------------------------------------------------------
    def flatten(self, v) -> Tensor:
        """``v`` (structure of θ, or ``(v_θ, v_φ)`` with a head) → one vector of length ``dim``."""
        if not self.has_head:
            return self.tree.flatten_selected(v)
        v_th, v_phi = v
        return torch.cat([self.tree.flatten_selected(v_th), self.head_tree.flatten_selected(tuple(v_phi))])

    def unflatten(self, vec: Tensor):
        if not self.has_head:
            return self.tree.unflatten_selected(vec)
        n = self.tree.selected_numel
        return (self.tree.unflatten_selected(vec[..., :n]), tuple(self.head_tree.unflatten_selected(vec[..., n:])))

    def flat_vp(self, vec: Tensor, term: str = "total") -> Tensor:
        """The product on a flat vector of length ``dim`` (or a stack ``(k, dim)``, batched
        by ``torch.func.vmap``: still 2 solves, each with k right-hand sides)."""
        if vec.ndim == 2:
            return torch.func.vmap(lambda u: self.flat_vp(u, term))(vec)
        return self.flatten(self.vp(self.unflatten(vec), term))

    def dense(self, term: str = "total") -> Tensor:
        """The ``(dim, dim)`` matrix of ``term`` (small problems): the products on the basis,
        batched — 2 solves with ``dim`` right-hand sides each."""
        like = self.z_star
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return self.flat_vp(eye, term).T  # column j = H e_j (rows of a symmetric H)


def _detach(tree):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
