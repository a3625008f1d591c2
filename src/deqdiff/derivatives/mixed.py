"""Second derivatives of z*: the general ``D²z*[u, v]`` and the mixed derivative
``H_{z*,tx} = ∂²z*/∂t∂x`` for a scalar variable t (Pacheco 2023, eq. hessian-t), as products
``v ↦ H v`` and ``u ↦ uᵀH``, dense for small problems, and the gradient of a loss on
``∂NN/∂t`` for ``NN = n_post ∘ z*`` (Pacheco 2023, "Computing gradients through derivatives
of DEQs").

Differentiating ``(I − J) z_v = ∂f/∂θ · v`` once more along ``u`` gives

    (I − J) D²z*[u, v] = D²f[(z_u, u), (z_v, v)]                                   (★)

the second directional derivative of ``f`` along the *total* directions ``(z_u, u)`` and
``(z_v, v)`` (``z_u = dz*[u]``). For u = ∂/∂t, v = x-direction this is eq. (hessian-t) of Pacheco (2023),

    H_{z*,tx} = (I − J)⁻¹ [ H_{f,tx} + 𝐇_{f,zx} ×₂ J_{z*,t} ],

where Pacheco (2023)'s partial Hessians of f must be read as total derivatives along z*: with
partial derivatives, (★) is ``(I−J)⁻¹ [f_tx + f_tz Z_x + f_zx z_t + f_zz(z_t, Z_x)]``. Note the
sign: Pacheco (2023) writes ``−(J_{f,z} − I)⁻¹ [H_{f,tx} − 𝐇_{f,zx} ×₂ J_{z*,t}]``, but its step
``(J_{f,z} − I)⁻¹ J_{f,t} = J_{z*,t}`` drops a minus sign (it equals ``−J_{z*,t}``); the
correct sign inside the bracket is ``+`` (checked against finite differences of J_{z*,t}
and unrolled autodiff in tests/derivatives/test_mixed.py).

Costs: ``deq_second_jvp`` 3 solves (2 when u = v); ``mixed_jvp`` 3 (2 with a given
``z_t``); ``mixed_vjp`` 3 (2 with ``z_t``); ``mixed_jacobian`` 1 + 2 batched;
``derivative_loss_grad`` 3 (plus, with ``create_graph=True``, the adjoint solves autograd
runs when the result is differentiated again).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ._problem import Equilibrium
from .jacobian import _dense_rows

__all__ = ["deq_second_jvp", "mixed_jvp", "mixed_vjp", "mixed_jacobian", "derivative_loss_grad"]


def deq_second_jvp(f: Callable, z_star: Tensor, params: Sequence[Any], argnums, u, v, **solve_options) -> Tensor:
    """``D²z*[u, v] = (I − J)⁻¹ D²f[(z_u, u), (z_v, v)]`` (★) for tangents ``u``, ``v`` with
    the structure of ``params[argnums]`` (``None`` = zero). 3 solves (2 when ``v is u``).
    Keeps the graph (differentiable w.r.t. every parameter)."""
    eq = Equilibrium(f, z_star, params, argnums, **solve_options)
    du = eq.tree.tangent_leaves(u)
    z_u = eq.z_tangent(du)
    if v is u:
        dv, z_v = du, z_u
    else:
        dv = eq.tree.tangent_leaves(v)
        z_v = eq.z_tangent(dv)
    return eq.solve(eq.f_second((z_u, du), (z_v, dv)))


def _t_dots(eq: Equilibrium, t_argnum: int, t_tangent) -> list:
    t_argnum = t_argnum % len(eq.tree.params)
    if t_tangent is None:
        t = eq.tree.params[t_argnum]
        if not isinstance(t, Tensor):
            raise TypeError("t must be a tensor (pass t_tangent for a pytree argument)")
        t_tangent = torch.ones_like(t)
    return eq.tree.fill_arg_tangent([None] * len(eq.leaves), t_argnum, t_tangent)


def _time_direction(eq: Equilibrium, t_argnum: int, t_tangent, z_t: Tensor | None):
    dots = _t_dots(eq, t_argnum, t_tangent)
    if z_t is None:
        z_t = eq.z_tangent(dots)  # J_{z*,t}: 1 forward solve
    return (z_t, dots)


def mixed_jvp(f: Callable, z_star: Tensor, params: Sequence[Any], t_argnum: int, x_argnums, v, *,
              t_tangent=None, z_t: Tensor | None = None, **solve_options) -> Tensor:
    """``H_{z*,tx} v = ∂/∂x (∂z*/∂t) · v`` (Pacheco 2023, eq. hessian-t; sign as corrected in the
    module docstring). ``t = params[t_argnum]`` (a scalar, or a per-sample tensor: the
    default ``t_tangent`` is ``ones_like(t)``); ``v`` has the structure of
    ``params[x_argnums]``. 3 solves: ``z_t``, ``Z_x v``, the final one (2 when ``z_t`` is
    given, e.g. from :func:`time_derivatives`)."""
    eq = Equilibrium(f, z_star, params, x_argnums, **solve_options)
    a = _time_direction(eq, t_argnum, t_tangent, z_t)
    dv = eq.tree.tangent_leaves(v)
    return eq.solve(eq.f_second(a, (eq.z_tangent(dv), dv)))


def _mixed_vjp(eq: Equilibrium, a, u: Tensor, idx: Sequence[int]) -> list[Tensor]:
    """``uᵀ H = g_x + Zᵀ g_z`` with ``(g_z, g_x) = ∇_{(z,x)} ⟨λ, Df[a]⟩``, ``λ = (I−J)⁻ᵀ u``:
    2 adjoint solves."""
    lam = eq.solve_T(u)
    g_z, g_x = eq.f_second_vjp(lam, a, idx)
    back = eq.z_cotangent(g_z, idx)
    return [b + g_x[i] for i, b in zip(idx, back)]


def mixed_vjp(f: Callable, z_star: Tensor, params: Sequence[Any], t_argnum: int, x_argnums, u: Tensor, *,
              t_tangent=None, z_t: Tensor | None = None, **solve_options):
    """``uᵀ H_{z*,tx}`` with the structure of ``params[x_argnums]``: ``λ = (I − J)⁻ᵀ u``,
    then ``g_x + Zᵀ g_z`` with ``(g_z, g_x) = ∇_{(z,x)} λᵀ Df[(z_t, ṫ)]`` — Pacheco (2023)'s
    "series of vJps and fixed-point solves". 3 solves (z_t forward, λ and Zᵀg_z adjoint;
    2 with a given ``z_t``)."""
    eq = Equilibrium(f, z_star, params, x_argnums, **solve_options)
    a = _time_direction(eq, t_argnum, t_tangent, z_t)
    return eq.tree.pack(_mixed_vjp(eq, a, u, eq.tree.selected))


def mixed_jacobian(f: Callable, z_star: Tensor, params: Sequence[Any], t_argnum: int, x_argnums=0, *,
                   t_tangent=None, batch_ndim: int = 0, sample_argnums: Sequence[int] | None = None,
                   **solve_options):
    """Dense ``H_{z*,tx} = ∂²z*/∂t∂x`` for small problems, laid out like
    :func:`~deqdiff.derivatives.deq_jacobian` (per-sample blocks for arguments that carry
    the batch). 1 solve for ``z_t`` + 2 batched adjoint solves (one rhs per output)."""
    eq = Equilibrium(f, z_star, params, x_argnums, batch_ndim=batch_ndim, **solve_options)
    a = _time_direction(eq, t_argnum, t_tangent, None)
    return _dense_rows(eq, lambda c, idx: _mixed_vjp(eq, a, c, idx), batch_ndim, sample_argnums)


def derivative_loss_grad(f: Callable, z_star: Tensor, params: Sequence[Any], t_argnum: int, argnums,
                         n_post: Callable, loss: Callable[[Tensor], Tensor], *, post_params: Sequence[Tensor] = (),
                         t_tangent=None, create_graph: bool = False, **solve_options):
    """Value and gradient of ``ℓ(∂NN/∂t)`` with ``NN = n_post(z*(t, θ), *post_params)``
    (Pacheco 2023, "Computing gradients through derivatives of DEQs").

    ``∂NN/∂t = J_{n_post} z_t`` and, with ``u = ∇ℓ``,

        ∇_θ ℓ = uᵀ [H_{n_post,zθ} ×₂ z_t + J_{n_post} H_{z*,tθ}]
              = g_θ + Zᵀ (G + g_z),   G = ∇_z ⟨u, Dn_post(z*)[z_t]⟩,
                (g_z, g_θ) = ∇_{(z,θ)} ⟨λ, Df[(z_t, ṫ)]⟩,  λ = (I − J)⁻ᵀ J_{n_post}ᵀ u.

    3 solves: z_t (forward), λ and the final ``Zᵀ(G + g_z)`` (adjoint): Pacheco (2023)'s two
    backward fixed points for G and V are merged into one. Returns
    ``(value, grads, post_grads)``: ``grads`` like ``params[argnums]``, ``post_grads`` a tuple
    like ``post_params`` (empty when there are none). Plain tensors by default; with
    ``create_graph=True`` they keep their graph w.r.t. ``params`` and ``post_params`` (every
    solve is an engine node), so e.g. a Hessian-vector product of the physics loss is one more
    ``torch.autograd.grad`` (which runs further implicit solves).
    """
    eq = Equilibrium(f, z_star, params, argnums, graph=create_graph, **solve_options)
    z = eq.z
    a = _time_direction(eq, t_argnum, t_tangent, None)
    z_t = a[0]
    post = tuple(post_params) if create_graph else tuple(p.detach() for p in post_params)

    def y_t_of(zz, *pp):
        return torch.func.jvp(lambda q: n_post(q, *pp), (zz,), (z_t,))[1]

    def objective(zz, *pp):
        return loss(y_t_of(zz, *pp))

    y_t = y_t_of(z, *post)
    u, value = torch.func.grad_and_value(loss)(y_t)
    _, pull_n = torch.func.vjp(lambda q: n_post(q, *post), z)
    (u_z,) = pull_n(u)  # J_{n_post}ᵀ u
    _, pull_G = torch.func.vjp(lambda q: y_t_of(q, *post), z)
    (G,) = pull_G(u)  # ∇_z ⟨u, Dn_post(z)[z_t]⟩ at fixed z_t
    idx = eq.tree.selected
    lam = eq.solve_T(u_z)
    g_z, g_th = eq.f_second_vjp(lam, a, idx)
    back = eq.z_cotangent(G + g_z, idx)
    grads = eq.tree.pack([b + g_th[i] for i, b in zip(idx, back)])
    post_grads = ()
    if post:
        post_grads = torch.func.grad(lambda *pp: objective(z, *pp), argnums=tuple(range(len(post))))(*post)
    if create_graph:
        return value, grads, tuple(post_grads)
    detach = lambda tree: tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)  # noqa: E731
    return value.detach(), detach(grads), detach(tuple(post_grads))
