"""The shared plumbing of ``deqdiff.derivatives``: parameter pytrees and the equilibrium
``z* = f(z*, *params)`` with its operator ``I − J`` (``J = ∂f/∂z`` at z*).

:class:`Equilibrium` is engine-backed: every solve is ``solve_with_operator`` with one
:class:`~deqdiff.engine.FixedPointJacobian` per equilibrium (one linearization of ``f`` and,
for small rows, one LU shared by all the solves of a product), and z* is re-entered into
``deqdiff.fixed_point`` so that results keep their dependence on the parameters through z*
(graphs for a further ``torch.autograd.grad``). No solver loop lives here.

Pacheco 2023, eq. deq-jacobian:  ``J_{z*} = −[J_{f,z} − I]⁻¹ J_{f,x} = (I − J)⁻¹ ∂f/∂x``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..engine import FixedPointJacobian, fixed_point
from ..solvers.base import ConvergenceError, ConvergenceWarning, SolveInfo
from ..engine.functional import hvp_by_vjp
from ..engine.linear_solve import solve_with_operator
from ..engine.validation import is_transformed

__all__ = ["Equilibrium", "ParamTree", "check_given_fixed_point", "default_tol", "default_z_tol"]


def default_tol(dtype: torch.dtype) -> float:
    """Derivative-solve tolerance: 1e-10 in float64, ~1e-5 in float32 (100 eps)."""
    return max(1e-10, 100 * torch.finfo(dtype).eps)


def default_z_tol(dtype: torch.dtype) -> float:
    """Acceptance tolerance of a given z*: ``fixed_point``'s default 1e-6 (100 eps in float32)."""
    return max(1e-6, 100 * torch.finfo(dtype).eps)


def check_given_fixed_point(polish: SolveInfo, z_tol: float, atol: float, tol: float, on_fail: str) -> None:
    """Report (``on_fail``) rows of the given z* whose relative residual exceeds ``z_tol``.

    The polishing solve started at z*, so its first recorded residual (iteration 0) is the
    residual of z* itself: no extra evaluation of ``f``."""
    if on_fail == "ignore" or polish.abs_trace.shape[0] == 0:
        return
    res, rel = polish.abs_trace[0], polish.rel_trace[0]
    scale = torch.where(rel > 0, res / rel.clamp_min(1e-300), torch.zeros_like(res))
    bad = res > atol + z_tol * scale
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten()
    worst = int(rows[res[rows].argmax()])
    msg = (
        f"z_star is not a fixed point of f: {rows.numel()}/{bad.numel()} rows have residual "
        f"‖f(z*) − z*‖ above atol + z_tol·‖f(z*)‖ (z_tol={z_tol:g}, atol={atol:g}); worst row {worst} has "
        f"residual {float(res[worst]):.3e} (relative {float(rel[worst]):.3e}). "
        + (f"It was polished to tol={tol:g} before differentiating "
           f"(now max residual {polish.max_residual:.3e}). " if polish.all_converged else "")
        + "Pass the converged fixed point, or set z_tol / on_fail='ignore'."
    )
    if on_fail == "raise":
        raise ConvergenceError(msg, polish)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


class ParamTree:
    """``params`` (a tuple of positional arguments of ``f``, each a tensor or a pytree of
    tensors such as a dict of module parameters) as one flat list of leaf tensors, and the
    ``argnums`` selection in the style of ``torch.func``."""

    def __init__(self, params: Sequence[Any], argnums: int | Sequence[int] = ()):
        if isinstance(params, Tensor) or not isinstance(params, (tuple, list)):
            raise TypeError("params must be a tuple of f's arguments after z, e.g. (A, x) or (params_dict, x)")
        self.params = tuple(params)
        self.specs, self.offsets, leaves = [], [], []
        for i, p in enumerate(self.params):
            lv, spec = tree_flatten(p)
            for leaf in lv:
                if not isinstance(leaf, Tensor):
                    raise TypeError(
                        f"params[{i}] has a leaf of type {type(leaf).__name__}; every leaf must be a tensor "
                        "(pass constants through a closure)"
                    )
            self.offsets.append(len(leaves))
            self.specs.append((spec, len(lv)))
            leaves.extend(lv)
        self.leaves = tuple(leaves)
        self.single = isinstance(argnums, int)
        self.argnums = (argnums,) if self.single else tuple(argnums)
        for a in self.argnums:
            if not -len(self.params) <= a < len(self.params):
                raise ValueError(f"argnums {a} out of range for {len(self.params)} params")
        self.argnums = tuple(a % len(self.params) for a in self.argnums)

    def unflatten(self, leaves: Sequence[Tensor]) -> tuple:
        out = []
        for off, (spec, n) in zip(self.offsets, self.specs):
            out.append(tree_unflatten(list(leaves[off:off + n]), spec))
        return tuple(out)

    def flat_f(self, f: Callable) -> Callable:
        """``(z, *leaves) ↦ f(z, *params)``: the engine's view of ``f``."""

        def g(z, *leaves):
            return f(z, *self.unflatten(leaves))

        return g

    def arg_leaves(self, a: int) -> range:
        spec, n = self.specs[a]
        return range(self.offsets[a], self.offsets[a] + n)

    @property
    def selected(self) -> list[int]:
        """Leaf indices of the differentiated arguments, in ``argnums`` order."""
        return [i for a in self.argnums for i in self.arg_leaves(a)]

    def tangent_leaves(self, tangents) -> list[Tensor | None]:
        """A tangent with the structure of ``params[argnums]`` (``None`` = zero) as a list
        aligned with all leaves (``None`` for leaves not differentiated)."""
        per_arg = (tangents,) if self.single else tuple(tangents)
        if len(per_arg) != len(self.argnums):
            raise ValueError(f"expected {len(self.argnums)} tangents (one per argnum), got {len(per_arg)}")
        out: list[Tensor | None] = [None] * len(self.leaves)
        for a, t in zip(self.argnums, per_arg):
            self.fill_arg_tangent(out, a, t)
        return out

    def fill_arg_tangent(self, out: list, a: int, t) -> list:
        """Write the tangent ``t`` of ``params[a]`` (a pytree like it, ``None`` = zero; a
        number broadcasts) into the leaf-aligned list ``out``."""
        if t is None:
            return out
        idx = list(self.arg_leaves(a))
        lv = [t] if len(idx) == 1 and not isinstance(t, (dict, list, tuple)) else tree_flatten(t)[0]
        if len(lv) != len(idx):
            raise ValueError(f"tangent for params[{a}] has {len(lv)} leaves, expected {len(idx)}")
        for i, ti in zip(idx, lv):
            if ti is None:
                continue
            ti = torch.as_tensor(ti, dtype=self.leaves[i].dtype, device=self.leaves[i].device)
            out[i] = ti.expand_as(self.leaves[i]) if ti.shape != self.leaves[i].shape else ti
        return out

    def pack(self, selected_values: Sequence[Tensor]):
        """Values for ``self.selected`` leaves → the structure of ``params[argnums]``."""
        it = iter(selected_values)
        per_arg = []
        for a in self.argnums:
            spec, n = self.specs[a]
            per_arg.append(tree_unflatten([next(it) for _ in range(n)], spec))
        return per_arg[0] if self.single else tuple(per_arg)

    def flatten_selected(self, tree) -> Tensor:
        """A pytree like ``params[argnums]`` → one flat vector (leaf order of ``selected``)."""
        leaves = self.tangent_leaves(tree)
        return torch.cat([
            (leaves[i] if leaves[i] is not None else torch.zeros_like(self.leaves[i])).reshape(-1)
            for i in self.selected
        ])

    def unflatten_selected(self, vec: Tensor):
        vals, k = [], 0
        for i in self.selected:
            n = self.leaves[i].numel()
            vals.append(vec[..., k:k + n].reshape(*vec.shape[:-1], *self.leaves[i].shape))
            k += n
        return self.pack(vals)

    @property
    def selected_numel(self) -> int:
        return sum(self.leaves[i].numel() for i in self.selected)


def _replace(seq: Sequence, idx: Sequence[int], values: Sequence) -> list:
    out = list(seq)
    for i, v in zip(idx, values):
        out[i] = v
    return out


class Equilibrium:
    """z* of ``f`` at ``params`` with its operator ``A = I − J``.

    ``z_star`` must be the fixed point (e.g. the output of ``deqdiff.fixed_point``); it is
    passed once more through ``deqdiff.fixed_point`` (started at z*, so it costs one
    evaluation of ``f`` when z* meets ``tol``, a few polishing iterations otherwise), which
    makes z* a differentiable function of every parameter leaf. ``graph=False`` detaches the
    parameters: results are plain numbers.

    The given z* is checked on that first evaluation: a row with ``‖f(z*) − z*‖ > atol +
    z_tol·‖f(z*)‖`` is reported by ``on_fail`` (warning or :class:`~deqdiff.ConvergenceError`
    naming the residual; ``"ignore"`` polishes silently). Defaults: ``tol`` (derivative
    solves and polishing) ``max(1e-10, 100·eps)``, ``z_tol`` ``max(1e-6, 100·eps)`` of the dtype.

    ``solves`` lists the :class:`~deqdiff.SolveInfo` of every linear solve run with the
    operator (forward-mode tangents, adjoints, and those run later by autograd): the costs
    stated in the docstrings are checked against it in the tests.
    """

    def __init__(
        self, f: Callable, z_star: Tensor, params: Sequence[Any], argnums: int | Sequence[int] = (), *,
        batch_ndim: int = 0, graph: bool = True, solver: str | Callable = "auto", tol: float | None = None,
        atol: float = 0.0, max_iter: int = 1000, on_fail: str = "warn", options: dict | None = None,
        z_tol: float | None = None,
    ):
        if not isinstance(z_star, Tensor):
            raise TypeError(f"z_star must be a tensor (the fixed point), got {type(z_star).__name__}")
        if on_fail not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_fail must be 'raise', 'warn' or 'ignore', got {on_fail!r}")
        self.tree = ParamTree(params, argnums)
        self.f = self.tree.flat_f(f)
        leaves = self.tree.leaves if graph else tuple(p.detach() for p in self.tree.leaves)
        self.leaves = leaves
        self.batch_ndim = batch_ndim
        self.solves: list = []
        tol = default_tol(z_star.dtype) if tol is None else tol
        self.z, info = fixed_point(
            self.f, z_star.detach(), *leaves, solver="anderson", tol=tol, atol=atol, max_iter=200,
            batch_ndim=batch_ndim, on_fail=on_fail, backward_solver=solver, backward_tol=tol,
            backward_atol=atol, backward_max_iter=max_iter, backward_options=options, return_info=True,
        )
        self.polish = info.forward
        check_given_fixed_point(info.forward, default_z_tol(z_star.dtype) if z_tol is None else z_tol,
                                atol, tol, on_fail)
        cfg = dict(solver=solver, tol=tol, atol=atol, max_iter=max_iter, options=dict(options or {}),
                   on_fail=on_fail, kind="derivative", record=self.solves.append)
        self.op = FixedPointJacobian(self.f, self.z.shape, batch_ndim, config=cfg)

    # --- linear solves with A = I − J (each call is one solve) ------------------------------
    def solve(self, b: Tensor) -> Tensor:
        """``(I − J)⁻¹ b`` — one forward (tangent) solve."""
        return solve_with_operator(self.op, b, (self.z, *self.leaves))

    def solve_T(self, b: Tensor) -> Tensor:
        """``(I − J)⁻ᵀ b`` — one adjoint solve."""
        return solve_with_operator(self.op.T, b, (self.z, *self.leaves))

    # --- partial derivatives of f at (z*, θ): no solves -------------------------------------
    def _partial(self, idx: Sequence[int]) -> Callable:
        def g(z, *ps):
            return self.f(z, *_replace(self.leaves, idx, ps))
        return g

    def _dirs(self, *directions):
        """Leaf indices touched by any direction ``(ż, leaf_dots)``."""
        return sorted({i for _, dots in directions for i, t in enumerate(dots) if t is not None})

    def _tangent(self, direction, idx):
        z_dot, dots = direction
        zt = torch.zeros_like(self.z) if z_dot is None else z_dot
        return (zt, *[dots[i] if dots[i] is not None else torch.zeros_like(self.leaves[i]) for i in idx])

    def f_jvp(self, z_dot: Tensor | None, leaf_dots: Sequence[Tensor | None]) -> Tensor:
        """``Df[(ż, θ̇)] = ∂f/∂z ż + ∂f/∂θ θ̇`` (forward mode through ``f``)."""
        idx = self._dirs((z_dot, leaf_dots))
        primals = (self.z, *[self.leaves[i] for i in idx])
        return torch.func.jvp(self._partial(idx), primals, self._tangent((z_dot, leaf_dots), idx))[1]

    def f_vjp(self, w: Tensor, idx: Sequence[int]) -> tuple[Tensor, ...]:
        """``(∂f/∂θ_i)ᵀ w`` for the leaves ``idx`` (partial at fixed z)."""
        idx = list(idx)
        _, pull = torch.func.vjp(lambda *ps: self._partial(idx)(self.z, *ps), *[self.leaves[i] for i in idx])
        return pull(w)

    def f_second(self, a, b) -> Tensor:
        """``D²f[a, b]``: the second directional derivative of ``f`` along ``a = (ż_a, θ̇_a)``
        and ``b = (ż_b, θ̇_b)`` (forward over forward through ``f`` itself)."""
        idx = self._dirs(a, b)
        g = self._partial(idx)
        primals = (self.z, *[self.leaves[i] for i in idx])
        ta, tb = self._tangent(a, idx), self._tangent(b, idx)
        # forward over forward: wrong through layer_norm in PyTorch 2.13, and so is every
        # reverse-only route tried (CHANGELOG, known limitations); hvp_by_vjp serves the Hessians
        return torch.func.jvp(lambda *p: torch.func.jvp(g, p, ta)[1], primals, tb)[1]

    def f_second_vjp(self, lam: Tensor, a, idx: Sequence[int]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``∇_{(z, θ_idx)} ⟨λ, Df[a]⟩`` = the Hessian of ``S = λᵀf`` (λ fixed) applied to
        ``a``: returns ``(g_z, g_θ)`` (reverse over reverse through ``f``)."""
        idx = sorted(set(idx) | set(self._dirs(a)))
        g = self._partial(idx)
        ta = self._tangent(a, idx)
        primals = (self.z, *[self.leaves[i] for i in idx])
        grads = hvp_by_vjp(g, primals, lam, ta)
        return grads[0], dict(zip(idx, grads[1:]))

    # --- Z = dz*/dθ = (I − J)⁻¹ ∂f/∂θ -------------------------------------------------------
    def z_tangent(self, leaf_dots: Sequence[Tensor | None]) -> Tensor:
        """``Z θ̇ = (I − J)⁻¹ ∂f/∂θ θ̇`` — one forward solve (Pacheco 2023, eq. deq-jacobian)."""
        return self.solve(self.f_jvp(None, leaf_dots))

    def z_cotangent(self, w: Tensor, idx: Sequence[int]) -> tuple[Tensor, ...]:
        """``Zᵀ w = (∂f/∂θ)ᵀ (I − J)⁻ᵀ w`` — one adjoint solve (Pacheco 2023, eq.
        deq-backward-fixed-point)."""
        return self.f_vjp(self.solve_T(w), idx)

    def transformed(self) -> bool:
        return is_transformed(self.z) or any(is_transformed(p) for p in self.leaves)
