"""The fixed-point node ``z* = f(z*, θ)``, differentiable to every order by implicit solves.

By the implicit function theorem (Pacheco 2023, eq. deq-jacobian), with ``J = ∂f/∂z`` at z*:

* forward mode:  ``ż = (I − J)⁻¹ (∂f/∂θ · θ̇)``;
* reverse mode:  ``wᵀ = wᵀJ + z̄ᵀ`` (Pacheco 2023, eq. deq-backward-fixed-point), ``θ̄ = wᵀ ∂f/∂θ``;
  where a backward pass wants only per-row scalar inputs (the time of a physics-informed DEQ),
  ``θ̄ᵣ = ⟨z̄ᵣ, żᵣ⟩`` with the tangent ``ż = (I − J)⁻¹ ∂f/∂θ · 1``: one solve serves every
  output differentiated (dy₁/dt, dy₂/dt, …) where reverse mode solves an adjoint per output.

The solves go through the differentiable ``linear_solve`` with ``A = I − J(z*, θ)`` whose
parameters are ``(z*, θ)``; z* itself is this node's output, so differentiating a
derivative once more re-enters this node — the recursion that yields every order. The
forward iterations run without a graph: nothing of them is kept.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ..solvers.base import SolveInfo, get_solver, report_failure
from ..solvers.scaling import solve_forward_rescaled
from .functional import forbid_nested_forward, jvp_by_vjp, live_tangents, vjp
from .linear_solve import solve_with_operator
from .operators import FixedPointJacobian
from .phantom import PhantomGrad, backward_mode
from .structure import infer_rows
from .warm_start import WarmStart
from .validation import check_fixed_point_inputs, check_row_params, check_solve_options

__all__ = ["FixedPointSpec", "FixedPointInfo", "fixed_point", "fixed_point_node"]


@dataclass
class FixedPointInfo:
    """Statistics of a fixed point: the forward solve and every derivative solve run
    through it since (appended as autograd reaches them)."""

    forward: SolveInfo | None = None
    derivatives: list[SolveInfo] = field(default_factory=list)


@dataclass
class FixedPointSpec:
    """Everything about a fixed-point problem that is not a tensor input."""

    f: Callable[..., Tensor]
    batch_ndim: int
    solver: str | Callable
    tol: float
    atol: float
    max_iter: int
    options: dict
    on_fail: str
    store_trajectory: bool
    derivative: dict  # config of the derivative linear solves
    info: FixedPointInfo
    row_params: tuple[int, ...] | None = None  # params whose dim 0 indexes the rows (batch_ndim 1)
    first_eval: Tensor | None = None  # f(z0, *params) from input validation, used once by the forward solve
    warm: WarmStart | None = None  # previous solutions to start from (opt-in)

    def operator(self, z: Tensor, params) -> FixedPointJacobian:
        cfg = dict(self.derivative, record=self.info.derivatives.append)
        if self.info.forward is not None:  # Richardson in "auto" gets twice the forward's iterations
            cold = self.info.forward.max_iterations
            if self.warm is not None:  # a warm forward solve says nothing about a cold start
                cold, cfg["warm"] = max(cold, self.warm.cold_iterations or 0), self.warm.call()
            cfg["richardson_budget"] = 2 * cold + 10
        return FixedPointJacobian(self.f, z.shape, self.batch_ndim, config=cfg, row_params=self.row_params)

    def vmapped(self, in_dims, size) -> "FixedPointSpec":
        f = torch.func.vmap(self.f, in_dims=(0, *in_dims))
        # solver options tied to the row layout (splitting structures: ``vmap_rows``) follow the
        # stacked rows; one copy per object, so forward and derivative solves still share it
        memo: dict[int, object] = {}

        def rows(opts: dict) -> dict:
            for v in opts.values():
                if hasattr(v, "vmap_rows") and id(v) not in memo:
                    memo[id(v)] = v.vmap_rows(size)
            return {k: memo.get(id(v), v) for k, v in opts.items()}

        derivative = dict(self.derivative, options=rows(self.derivative["options"]))
        return replace(self, f=f, batch_ndim=self.batch_ndim + 1, row_params=None, first_eval=None, warm=None,
                       options=rows(self.options), derivative=derivative)


def _forward_solve(spec: FixedPointSpec, z0: Tensor, params) -> Tensor:
    shape = z0.shape
    S = math.prod(shape[: spec.batch_ndim])
    N = math.prod(shape[spec.batch_ndim :])
    solver = get_solver(spec.solver, "forward")
    # the iterations run under no_grad on the tensors as given (not detached copies: a map may
    # recognise its own tensors, as DEQ does to skip swapping module parameters in)

    def g(z: Tensor, rows: Tensor | None = None) -> Tensor:
        if rows is None:
            return spec.f(z.reshape(shape), *params).reshape(S, N)
        sub = [p.index_select(0, rows) if i in spec.row_params else p for i, p in enumerate(params)]
        return spec.f(z.reshape(rows.numel(), *shape[1:]), *sub).reshape(rows.numel(), N)

    g.row_subsets = spec.row_params is not None and spec.batch_ndim == 1

    gz0, spec.first_eval = spec.first_eval, None
    with torch.no_grad():
        z, info = solve_forward_rescaled(
            solver, g, z0.detach().reshape(S, N), None if gz0 is None else gz0.reshape(S, N),
            tol=spec.tol, atol=spec.atol, max_iter=spec.max_iter,
            store_trajectory=spec.store_trajectory, **spec.options,
        )
    spec.info.forward = info
    if spec.warm is not None:
        spec.warm.store_forward(z.reshape(shape), info.max_iterations)
    report_failure(info, spec.on_fail, "fixed-point forward solve")
    return z.reshape(shape)


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(spec: FixedPointSpec, z0: Tensor, *params: Tensor) -> Tensor:
        return _forward_solve(spec, z0, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, _, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(output, *params)
        ctx.save_for_forward(output, *params)

    @staticmethod
    def backward(ctx, z_bar: Tensor):
        z, *params = ctx.saved_tensors
        wanted = _wanted_params(ctx, len(params))
        if _row_tangent_route(ctx.spec, z, params, wanted):
            grads: list[Tensor | None] = [None] * len(params)
            for i, z_dot in zip(wanted, _row_tangents(ctx, z, params, wanted)):
                grads[i] = (z_bar * z_dot).reshape(z.shape[0], -1).sum(1).reshape(params[i].shape)
            return (None, None, *grads)
        op = _operator(ctx, z, params)
        first_order = not torch.is_grad_enabled()  # no create_graph: this solve is the linearization's last
        with _single_solve(op, first_order):
            w = solve_with_operator(op.T, z_bar, (z, *params))  # (I − J)ᵀ w = z̄
        pulled = None
        if first_order:  # the parameters' vjp from the solve's graph of f at z*, freed as it runs; or
            pulled = op.held_param_vjp(w, wanted) if wanted else None
            op.release()  # that graph is freed before the vjp records another: never both held
        grads = [None] * len(params)
        if wanted:
            if pulled is None:
                pulled = vjp(ctx.spec.f, (z, *params), [i + 1 for i in wanted], w)
            for i, g in zip(wanted, pulled):
                grads[i] = g
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _, z0_dot, *p_dot):
        forbid_nested_forward()
        z, *params = ctx.saved_tensors
        p_dot = live_tangents(p_dot)
        idx = [i for i, t in enumerate(p_dot) if t is not None]
        if not idx:
            return torch.zeros_like(z)
        rhs = jvp_by_vjp(ctx.spec.f, (z, *params), [i + 1 for i in idx], [p_dot[i] for i in idx])
        return solve_with_operator(_operator(ctx, z, params), rhs, (z, *params))  # (I − J) ż = ∂f/∂θ·θ̇

    @staticmethod
    def vmap(info, in_dims, spec, z0, *params):
        size = info.batch_size
        z_dim, p_dims = in_dims[1], in_dims[2:]
        z0 = z0.movedim(z_dim, 0) if z_dim is not None else z0.expand(size, *z0.shape)
        params = tuple(p if d is None else p.movedim(d, 0) for p, d in zip(params, p_dims))
        spec_v = spec.vmapped(tuple(None if d is None else 0 for d in p_dims), size)
        return _FixedPoint.apply(spec_v, z0, *params), 0


def _wanted_params(ctx, n: int) -> list[int]:
    """The params whose gradients the running backward pass uses: those that require grad,
    less those whose edge the autograd engine will not execute (``autograd.grad(out, t)`` wants
    ``t`` only). Kept where that cannot be told (a captured leaf of ``autograd.grad``, which
    PyTorch's query refuses, or no graph task)."""
    needs = ctx.needs_input_grad[2:]
    edges = getattr(ctx, "next_functions", ())[1:]  # the tensor inputs: z0, then the params
    if len(edges) != n:
        return [i for i in range(n) if needs[i]]
    wanted = []
    for i, (fn, _) in enumerate(edges):
        try:
            used = fn is not None and bool(torch._C._will_engine_execute_node(fn))
        except Exception:  # the query refused (a captured leaf, no graph task): keep it
            used = True
        if needs[i] and used:
            wanted.append(i)
    return wanted


def _row_tangent_route(spec: FixedPointSpec, z: Tensor, params, wanted: list[int]) -> bool:
    """Whether the wanted params are all per-row scalars (``row_params`` with one number per row,
    as the time or a coordinate of a physics-informed DEQ): their cotangent is then
    ``θ̄ᵣ = ⟨z̄ᵣ, ∂zᵣ*/∂θᵣ⟩`` from one tangent solve per param (forward mode), kept for every
    further backward pass through this node — one solve for all outputs differentiated, where
    reverse mode solves an adjoint per output."""
    if spec.batch_ndim != 1 or not spec.row_params or not wanted:
        return False
    return all(i in spec.row_params and params[i].numel() == z.shape[0] for i in wanted)


@contextmanager
def _single_solve(op: FixedPointJacobian, last: bool):
    """Marks a solve as the last one of ``op``'s linearization (a first-order backward), so that
    restricting it to rows frees the full graph first."""
    op.config["single_solve"] = last
    try:
        yield
    finally:
        op.config["single_solve"] = False


def _row_tangents(ctx, z: Tensor, params, route: list[int]) -> list[Tensor]:
    """``∂z*/∂θᵢ · 1 = (I − J)⁻¹ ∂f/∂θᵢ · 1`` for the per-row scalar params ``route``, cached on
    the node: without a graph as they are; with one (a derivative to be differentiated again)
    by weak reference, alive while a result that used them is (a strong reference would make a
    cycle node → tangent → solve node → z* → node that only a full garbage collection frees)."""
    create = torch.is_grad_enabled()
    cache = ctx.__dict__.setdefault("row_tangents", {})
    out = []
    for i in route:
        held = cache.get((i, True))
        z_dot = held() if held is not None else None
        if z_dot is not None and not create:
            z_dot = z_dot.detach()
        if z_dot is None and not create:
            z_dot = cache.get((i, False))
        if z_dot is None:
            rhs = jvp_by_vjp(ctx.spec.f, (z, *params), [i + 1], [torch.ones_like(params[i])])
            op = _operator(ctx, z, params)
            with _single_solve(op, not create):
                z_dot = solve_with_operator(op, rhs, (z, *params))  # (I − J) ż = ∂f/∂θᵢ·1
            if not create:
                op.release()
            cache[(i, create)] = weakref.ref(z_dot) if create else z_dot
        out.append(z_dot)
    return out


def _operator(ctx, z: Tensor, params) -> FixedPointJacobian:
    """``I − J`` at the fixed point, built once per node and shared by all its solves."""
    if getattr(ctx, "operator", None) is None:
        ctx.operator = ctx.spec.operator(z, params)
    return ctx.operator


def fixed_point_node(spec: FixedPointSpec, z0: Tensor, params) -> Tensor:
    return _FixedPoint.apply(spec, z0, *params)


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    *params: Tensor,
    solver: str | Callable = "auto",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 200,
    batch_ndim: int | None = None,
    on_fail: str = "warn",
    return_info: bool = False,
    store_trajectory: bool = False,
    backward_solver: str | Callable = "auto",
    backward_tol: float | None = None,
    backward_atol: float | None = None,
    backward_max_iter: int | None = None,
    backward_options: dict | None = None,
    row_params: tuple[int, ...] | None | bool = None,
    warm_start: WarmStart | None = None,
    grad: str | PhantomGrad = "exact",
    recompute_linearization: bool = False,
    **options,
):
    """Return z* with ``z* = f(z*, *params)``, differentiable to every order in ``params``.

    ``f(z, *params)`` must be a plain function of its arguments: every tensor z* depends
    on (weights, inputs, time …) is passed in ``params``. The leading ``batch_ndim`` dims of
    ``z0`` index independent problems (f must not mix them); each converges on its own.
    ``batch_ndim=None`` (default) finds out: dim 0 of a z0 with ≥ 2 dims counts as a batch
    of independent samples when probing f shows that no sample's output depends on another
    sample (:mod:`deqdiff.engine.structure`), else the whole z0 is one problem (0).

    ``solver="auto"`` runs plain iteration and hands the samples still running after 40
    iterations to Anderson acceleration (:mod:`deqdiff.solvers.auto`); ``"anderson"``,
    ``"broyden"``, ``"fixed_point"``, ``"newton_krylov"`` run one method throughout.
    ``backward_solver="auto"`` picks a dense LU, or Richardson on the samples still running
    with a dense or GMRES finish (README); ``"anderson"`` accelerates the derivative solves
    where plain iteration contracts slowly.

    Tolerance: problem ``s`` has converged when ``‖f(z)_s − z_s‖₂ ≤ atol + tol·‖f(z)_s‖₂``
    (relative residual, Nguyen 2022, eq. 4.2). Derivative solves with ``I − ∂f/∂z`` stop at
    ``‖b − A x‖₂ ≤ backward_atol + backward_tol·‖b‖₂`` and default to the forward
    tolerances. ``on_fail`` ("warn", "raise", "ignore") says what a solve that ends above
    tolerance does. ``options`` go to the forward solver (e.g. ``m``, ``damping``).

    ``row_params`` (with ``batch_ndim=1``): indices of the params whose dim 0 indexes the
    rows, as ``x`` in ``f(z, W, x)``; f must then accept any number of rows. The forward
    solvers ``fixed_point`` and ``anderson`` use it to evaluate f on the rows still running
    only, so samples that converged early cost nothing more. Left ``None`` with a batch, it is
    found by the same probe (params whose gradient stays in the probed samples' rows);
    ``row_params=False`` turns row subsets off.

    ``warm_start`` (a :class:`~deqdiff.engine.warm_start.WarmStart`, passed at every call of
    a training loop that solves the same samples again): the forward solve starts from the
    previous z* and each derivative solve from the previous solution of the same solve; the
    derivatives are unchanged to tolerance (they depend on z*, not on the start).

    ``recompute_linearization=True``: the derivative solves hold no vjp graph of ``f`` at z*
    (one evaluation's activations); each of their products evaluates ``f`` again (activation
    recomputation, Chen et al. 2016): less memory, about one more evaluation of ``f`` per
    iteration, the same derivatives to every order.

    Reverse mode w.r.t. per-row scalar params only (``t`` of shape ``(S, 1)`` or ``(S,)`` in
    ``row_params``, e.g. ``autograd.grad(y[:, i].sum(), t, create_graph=True)`` per output of a
    physics-informed DEQ) solves the tangent ``∂z*/∂t`` once and serves every such backward pass
    through this z* from it; a pass that also wants other gradients solves the adjoint.

    ``grad``: ``"exact"`` (implicit, every order) or ``"phantom"`` / a ``PhantomGrad(steps, damping)``
    (Geng et al. 2021: derivatives of k damped steps from z*; :mod:`deqdiff.engine.phantom`).

    With ``return_info=True`` returns ``(z*, FixedPointInfo)``; its ``derivatives`` list
    fills as autograd runs derivative solves through this fixed point.
    """
    if not isinstance(recompute_linearization, bool):
        raise TypeError(f"recompute_linearization must be True or False, got {recompute_linearization!r}")
    if warm_start is not None:
        if not isinstance(warm_start, WarmStart):
            raise TypeError(f"warm_start must be a deqdiff.WarmStart, got {type(warm_start).__name__}")
        z0 = warm_start.initial_state(z0)
    first_eval = check_fixed_point_inputs(f, z0, params, 0 if batch_ndim is None else batch_ndim)
    check_solve_options(z0.dtype, tol=tol, atol=atol, max_iter=max_iter, on_fail=on_fail)
    check_solve_options(z0.dtype, tol=tol if backward_tol is None else backward_tol,
                        atol=atol if backward_atol is None else backward_atol,
                        max_iter=1 if backward_max_iter is None else backward_max_iter, on_fail=on_fail,
                        prefix="backward_")
    if row_params is False:  # explicitly none: every iteration evaluates every row
        row_params, probe_rows = None, False
    else:
        probe_rows = row_params is None
    if batch_ndim is None and row_params is not None:
        batch_ndim = 1  # naming per-sample params says the rows are samples
    if batch_ndim is None or (batch_ndim == 1 and probe_rows):
        want = batch_ndim is None
        probe = partial(infer_rows, f, z0, params, first_eval, want_batch=want)
        if warm_start is None:
            batch_ndim, found = probe()
        else:  # the same problem again: its structure was probed at the first call
            key = (f, want, *((t.shape, t.dtype, t.device) for t in (z0, *params)))
            batch_ndim, found = warm_start.structure(key, probe)
        row_params = found if probe_rows else None
    row_params = check_row_params(row_params, z0, params, batch_ndim)
    derivative = dict(
        solver=backward_solver, tol=tol if backward_tol is None else backward_tol,
        atol=atol if backward_atol is None else backward_atol,
        max_iter=10 * max_iter if backward_max_iter is None else backward_max_iter,
        options=dict(backward_options or {}), on_fail=on_fail, kind="derivative",
        recompute=recompute_linearization,
    )
    info = FixedPointInfo()
    spec = FixedPointSpec(
        f=f, batch_ndim=batch_ndim, solver=solver, tol=tol, atol=atol, max_iter=max_iter,
        options=options, on_fail=on_fail, store_trajectory=store_trajectory,
        derivative=derivative, info=info, row_params=row_params, first_eval=first_eval, warm=warm_start,
    )
    phantom = backward_mode(grad)
    if phantom is None:
        z = fixed_point_node(spec, z0, params)
    else:  # no implicit node: the derivatives are those of k damped steps from z*
        z = phantom.unroll(f, fixed_point_node(spec, z0, tuple(p.detach() for p in params)), params)
    return (z, info) if return_info else z
