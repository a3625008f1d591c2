"""Derivatives of z* along one input direction for physics-informed training:
``∂z*/∂t``, ``∂²z*/∂t²`` (or ``∂z*/∂x_i``, ``∂²z*/∂x_i²`` with a one-hot ``tangent``),
computed by forward-mode implicit solves and returned **with their graph**, so that a loss
on them can be differentiated again w.r.t. the weights (``torch.autograd.grad`` /
``.backward()``; each further order is again implicit solves run by the engine).

First order (Pacheco 2023, eq. deq-jacobian with x = t):  ``(I − J) z_t = f_t``.
Second order: differentiating ``(I − J) z_t = f_t`` along t once more,

    (I − J) z_tt = f_tt + 2 f_tz z_t + f_zz[z_t, z_t] = D²f[(z_t, ṫ), (z_t, ṫ)],

the second directional derivative of f along the total direction ``(z_t, ṫ)``, computed
by forward-over-forward through ``f`` itself (never through the fixed point, which refuses
it) and solved with the engine's differentiable linear solve.
Costs: order 1 — 1 solve; order 2 — 2 solves (a backward pass through them later costs one
adjoint solve per solve plus the fixed point's own adjoint).

:func:`input_derivatives` does this for several input directions at once (e.g. ``x`` and
``t`` of a PDE residual that needs ``u_t``, ``u_x``, ``u_xx``) from one linearization at z*,
and also returns z* re-entered with its graph, so that ``u`` and its derivatives share one
fixed-point node (one adjoint solve fewer in the backward pass than a separate ``u``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from ._problem import Equilibrium
from .mixed import _t_dots

__all__ = ["time_derivatives", "input_derivatives"]


def input_derivatives(f: Callable, z_star: Tensor, params: Sequence[Any], directions: dict[str, int],
                      second: Sequence[str] = (), *, tangents: dict[str, Any] | None = None,
                      **solve_options) -> tuple[Tensor, dict[str, Tensor]]:
    """``(z, d)``: z* with its graph w.r.t. ``params`` and, for every ``name: argnum`` in
    ``directions``, ``d[name]`` = the derivative of z* along ``params[argnum]`` (tangent
    ``tangents[name]``, default ``ones_like``: per-sample ∂z*_b/∂x_b for a per-sample input),
    ``(I − J) z_i = f_i``; for every name in ``second`` also ``d[name + name]``, the pure second
    derivative, ``(I − J) z_ii = D²f[(z_i, ẋ_i), (z_i, ẋ_i)]``. One linearization of ``I − J``
    serves every solve; each keeps its graph. Solves: one per direction plus one per second
    derivative. ``solve_options`` as :func:`time_derivatives`."""
    unknown = set(second) - set(directions)
    if unknown:
        raise ValueError(f"second derivatives need their first: {sorted(unknown)} not in directions")
    tangents = tangents or {}
    eq = Equilibrium(f, z_star, params, (), **solve_options)
    out: dict[str, Tensor] = {}
    for name, argnum in directions.items():
        dots = _t_dots(eq, argnum, tangents.get(name))
        out[name] = eq.z_tangent(dots)
        if name in second:
            a = (out[name], dots)
            out[name + name] = eq.solve(eq.f_second(a, a))
    return eq.z, out


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
    _, d = input_derivatives(f, z_star, params, {"t": t_argnum}, second=("t",) if order == 2 else (),
                             tangents={"t": tangent}, **solve_options)
    return (d["t"],) if order == 1 else (d["t"], d["tt"])
