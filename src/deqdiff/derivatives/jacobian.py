"""The DEQ Jacobian ``J_{z*} = dz*/dθ = (I − J)⁻¹ ∂f/∂θ`` (Pacheco 2023, eq. deq-jacobian):
matrix-free products and a dense matrix for small problems.

* ``deq_jvp``:  ``Z θ̇ = (I − J)⁻¹ (∂f/∂θ θ̇)`` — **1 forward solve**;
* ``deq_vjp``:  ``Zᵀ z̄ = (∂f/∂θ)ᵀ w``, ``(I − J)ᵀ w = z̄`` (Pacheco 2023, eq.
  deq-backward-fixed-point) — **1 adjoint solve**;
* ``deq_jacobian``: the dense Z, one batched adjoint solve with one right-hand side per
  output coordinate (one LU shared by all of them for rows of ≤ 64 unknowns).

``f(z, *params)`` is the layer, ``z_star`` its fixed point at ``params`` (e.g. the output of
``deqdiff.fixed_point``), ``params`` a tuple of tensors or pytrees of tensors (a dict of
module parameters works), ``argnums`` selects the differentiated arguments as in
``torch.func``. Results keep their graph: they are differentiable w.r.t. every parameter
(``torch.autograd.grad`` on them runs further implicit solves).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._problem import Equilibrium

__all__ = ["deq_jvp", "deq_vjp", "deq_jacobian"]


def deq_jvp(f: Callable, z_star: Tensor, params: Sequence[Any], argnums: int | Sequence[int], tangents,
            **solve_options) -> Tensor:
    """``dz*[θ̇] = (I − J)⁻¹ ∂f/∂θ · θ̇`` — 1 linear solve (forward mode).

    ``tangents`` has the structure of ``params[argnums]`` (a tuple of them when ``argnums``
    is a tuple; ``None`` entries are zero). ``solve_options``: ``batch_ndim``, ``solver``,
    ``tol``, ``atol``, ``max_iter``, ``on_fail``, ``options``, ``z_tol``, ``graph`` (see ``Equilibrium``).
    """
    eq = Equilibrium(f, z_star, params, argnums, **solve_options)
    return eq.z_tangent(eq.tree.tangent_leaves(tangents))


def deq_vjp(f: Callable, z_star: Tensor, params: Sequence[Any], argnums: int | Sequence[int], cotangent: Tensor,
            **solve_options):
    """``z̄ᵀ dz*/dθ = (∂f/∂θ)ᵀ (I − J)⁻ᵀ z̄`` — 1 linear solve (adjoint). Returns the
    structure of ``params[argnums]``."""
    eq = Equilibrium(f, z_star, params, argnums, **solve_options)
    idx = eq.tree.selected
    return eq.tree.pack(eq.z_cotangent(cotangent, idx))


def _batch_match(leaf: Tensor, batch_shape: torch.Size) -> bool:
    n = len(batch_shape)
    return n > 0 and leaf.ndim >= n and leaf.shape[:n] == batch_shape


def deq_jacobian(f: Callable, z_star: Tensor, params: Sequence[Any], argnums: int | Sequence[int] = 0, *,
                 batch_ndim: int = 0, sample_argnums: Sequence[int] | None = None, **solve_options):
    """Dense ``dz*/dθ`` for small problems, with the structure of ``params[argnums]``.

    Unbatched (``batch_ndim=0``): each leaf of shape ``P`` gives a ``(*z.shape, *P)`` tensor
    (``torch.func.jacrev`` layout). Batched (the leading ``batch_ndim`` dims of z* index
    samples that ``f`` does not mix): an argument listed in ``sample_argnums`` (default: the
    arguments whose leaves all start with z*'s batch shape) gives the per-sample blocks
    ``(*batch, *z_row, *x_row)`` with ``[s] = dz*_s/dx_s``; other arguments (shared weights)
    give ``(*batch, *z_row, *P)`` = ``dz*_s/dθ`` per sample.

    Cost: one batched adjoint solve with ``N`` right-hand sides (``N`` = unknowns per
    sample) for per-sample arguments and ``S·N`` for shared ones; they share one operator.
    """
    eq = Equilibrium(f, z_star, params, argnums, batch_ndim=batch_ndim, **solve_options)
    return _dense_rows(eq, eq.z_cotangent, batch_ndim, sample_argnums)


def _dense_rows(eq: Equilibrium, rows_of: Callable, batch_ndim: int, sample_argnums):
    """Dense ``d(·)/dθ`` from a cotangent map ``rows_of(c, leaf_idx) -> [cᵀ d(·)/dθ_i]``
    vmapped over basis cotangents (layout of :func:`deq_jacobian`)."""
    tree, z = eq.tree, eq.z
    batch_shape = z.shape[:batch_ndim]
    row_shape = z.shape[batch_ndim:]
    N = row_shape.numel()
    if sample_argnums is None:
        sample_argnums = [a for a in tree.argnums
                          if all(_batch_match(tree.leaves[i], batch_shape) for i in tree.arg_leaves(a))]
    sample_argnums = [a % len(tree.params) for a in sample_argnums]
    sample_leaves = [i for a in tree.argnums if a in sample_argnums for i in tree.arg_leaves(a)]
    shared_leaves = [i for i in tree.selected if i not in sample_leaves]
    out: dict[int, Tensor] = {}
    eye = torch.eye(N, dtype=z.dtype, device=z.device).reshape(N, *row_shape)

    if sample_leaves:  # cotangent e_i in every sample row: the rows do not mix
        basis = eye.reshape(N, *([1] * batch_ndim), *row_shape).expand(N, *z.shape)
        rows = torch.func.vmap(lambda c: tuple(rows_of(c, sample_leaves)))(basis)
        for i, r in zip(sample_leaves, rows):  # r: (N, *batch, *x_row)
            r = r.reshape(*row_shape, *r.shape[1:])
            nz = len(row_shape)
            perm = [nz + k for k in range(batch_ndim)] + list(range(nz)) + list(range(nz + batch_ndim, r.ndim))
            out[i] = r.permute(perm)
    if shared_leaves:
        M = z.numel()
        basis = torch.eye(M, dtype=z.dtype, device=z.device).reshape(M, *z.shape)
        rows = torch.func.vmap(lambda c: tuple(rows_of(c, shared_leaves)))(basis)
        for i, r in zip(shared_leaves, rows):
            out[i] = r.reshape(*z.shape, *eq.leaves[i].shape)
    return tree.pack([out[i] for i in tree.selected])
