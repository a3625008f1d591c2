"""Derivatives of z* along one input direction for physics-informed training:
``∂z*/∂t``, ``∂²z*/∂t²`` (or ``∂z*/∂x_i``, ``∂²z*/∂x_i²`` with a one-hot ``tangent``),
computed by forward-mode implicit solves and returned **with their graph**, so that a loss
on them can be differentiated again w.r.t. the weights (``torch.autograd.grad`` /
``.backward()``; each further order is again implicit solves run by the engine).

First order (seed 001, eq. deq-jacobian with x = t):  ``(I − J) z_t = f_t``.
Second order: differentiating ``(I − J) z_t = f_t`` along t once more,

    (I − J) z_tt = f_tt + 2 f_tz z_t + f_zz[z_t, z_t] = D²f[(z_t, ṫ), (z_t, ṫ)],

the second directional derivative of f along the total direction ``(z_t, ṫ)``, computed
by forward-over-forward through ``f`` itself (never through the fixed point, which refuses
it) and solved with the engine's differentiable linear solve.
Costs: order 1 — 1 solve; order 2 — 2 solves (a backward pass through them later costs one
adjoint solve per solve plus the fixed point's own adjoint).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from ._problem import Equilibrium
from .mixed import _t_dots

__all__ = ["time_derivatives"]


def time_derivatives(f: Callable, z_star: Tensor, params: Sequence[Any], t_argnum: int, order: int = 1, *,
                     tangent=None, **solve_options) -> tuple[Tensor, ...]:
    """``(z_t,)`` for ``order=1`` or ``(z_t, z_tt)`` for ``order=2``, where ``t =
    params[t_argnum]`` moves along ``tangent`` (default ``ones_like(t)``: for a per-sample
    ``t`` of shape ``(B,)`` with ``batch_ndim=1`` this is ∂z*_b/∂t_b for every sample). With a
    one-hot ``tangent`` on an input ``x`` this gives ``∂z*/∂x_i`` and ``∂²z*/∂x_i²``.

    Results keep their graph w.r.t. every tensor in ``params`` that requires grad. ``z_star``
    must be the fixed point (e.g. from ``deqdiff.fixed_point``); ``solve_options``:
    ``batch_ndim``, ``solver``, ``tol``, ``atol``, ``max_iter``, ``on_fail``, ``options``, ``z_tol``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    eq = Equilibrium(f, z_star, params, (), **solve_options)
    dots = _t_dots(eq, t_argnum, tangent)
    z_t = eq.z_tangent(dots)  # (I − J) z_t = f_t
    if order == 1:
        return (z_t,)
    a = (z_t, dots)
    z_tt = eq.solve(eq.f_second(a, a))  # (I − J) z_tt = D²f[a, a]
    return z_t, z_tt
