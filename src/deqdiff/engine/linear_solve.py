"""The differentiable linear solve ``x = A(p)⁻¹ b`` whose derivatives are again linear solves.

With ``A(p) x = b``:

* reverse mode, cotangent ``x̄``:  ``u = A(p)⁻ᵀ x̄``,  ``b̄ = u``,  ``p̄ = −∂_p ⟨u, A(p) x⟩``;
* forward mode, tangents ``(ḃ, ṗ)``:  ``ẋ = A(p)⁻¹ (ḃ − (∂_p A(p) x)·ṗ)``.

Both rules call the same solve again (with ``Aᵀ`` or ``A``) and express the rest with
differentiable PyTorch operations, so every order of reverse, forward and mixed
differentiation reduces to further linear solves with the operator at the same point.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..solvers.base import ResidualTrace, SolveInfo, concat_rows, get_solver, merge_rows, report_failure, row_norm
from ..solvers.scaling import solve_linear_rescaled
from .functional import forbid_nested_forward, jvp_by_vjp, live_tangents, vjp
from .validation import check_solve_options
from .operators import BoundOperator, FunctionOperator, LinearOperator, VmappedOperator

__all__ = ["linear_solve", "solve_with_operator"]


def _numeric_solve(op: LinearOperator, b: Tensor, params) -> Tensor:
    cfg = op.config
    rows = b.detach().reshape(op.rows, op.row_size)
    kw = dict(tol=cfg.get("tol", 1e-8), atol=cfg.get("atol", 0.0), max_iter=cfg.get("max_iter", 1000))
    with torch.no_grad():
        bound = op.bind(params, b)
        name = _pick_solver(cfg.get("solver", "auto"), bound)
        if name == ITERATIVE_AUTO:
            solve = partial(_iterative_auto, bound, budget=cfg.get("richardson_budget"))
        else:
            solve = partial(get_solver(name, "linear"), bound, **cfg.get("options", {}))
        warm = cfg.get("warm")
        key = None if warm is None else warm.key(op.transposed, rows)
        x, info = solve_linear_rescaled(solve, rows, x0=None if warm is None else warm.start(key), **kw)
        if warm is not None:
            warm.store(key, x)
    info.kind = cfg.get("kind", "linear") + (" (transposed)" if op.transposed else "")
    if cfg.get("record") is not None:
        cfg["record"](info)
    report_failure(info, cfg.get("on_fail", "warn"), f"linear solve '{info.kind}'")
    return x.reshape(b.shape)


DENSE_MAX_ROW_SIZE = 64
ITERATIVE_AUTO = "richardson→dense/gmres"
#: rows of at most this many unknowns finish Richardson's slow tail with a dense LU
DENSE_TAIL_MAX_ROW_SIZE = 256
#: Richardson iterations before GMRES takes over where no forward solve says how many to expect
#: (a linear solve of its own, or derivatives at a given point): Richardson diverges where
#: ρ(J) > 1, as in an untrained multiscale DEQ whose forward solve only Anderson finishes
RICHARDSON_BUDGET = 100
#: GMRES failures are finished by a dense LU when their blocks hold at most this many numbers
DENSE_FALLBACK_NUMBERS = 1 << 24
#: dense tail blocks are factored in chunks holding as many numbers as this many states,
#: or at least ``TAIL_MIN_NUMBERS`` (4 M numbers: below that, chunking only adds overhead)
TAIL_STATES = 2
TAIL_MIN_NUMBERS = 1 << 22
#: Richardson iterations after which the rows still running go to the dense tail (when their
#: blocks hold at most ``DENSE_FALLBACK_NUMBERS`` numbers): a row's block costs about 4N/3
#: products with ``A`` to build and factor, it is factored once for every derivative solve at
#: the same point, and each iteration of a loop carries fixed bookkeeping that a slow tail of few
#: rows pays for many iterations (ρ(J) ≈ 0.95 needs ~200)
TAIL_PROBE = 32


def _pick_solver(name, op: BoundOperator):
    """``"auto"``: a dense batched LU (cheap, exact, shared by every solve at the same point)
    for rows of ≤ 64 unknowns when all blocks hold ≤ ``TAIL_MIN_NUMBERS`` numbers or ``A``
    cannot be restricted to rows; else, where ``A`` restricts to rows (many independent
    samples, ``row_params``), Richardson on the rows still running with its slow tail
    finished densely; otherwise Richardson with a GMRES fallback."""
    if name != "auto":
        return name
    small = op.rows * op.row_size**2 <= TAIL_MIN_NUMBERS  # all blocks fit the dense budget
    if op.row_size <= DENSE_MAX_ROW_SIZE and (small or not op.can_restrict):
        return "dense"
    return ITERATIVE_AUTO


def _iterative_auto(op: BoundOperator, b: Tensor, x0: Tensor | None = None, *, budget: int | None, tol: float,
                    atol, max_iter: int):
    """Richardson x ← b + J x (it converges at the rate ρ(∂f/∂z) of a Picard forward solve,
    and only where that is < 1), then the rows still above tolerance are finished on their
    own. Where ``A`` restricts to rows of N ≤ 256 unknowns: rows already factored at this
    point start at their LU solution; Richardson runs ``TAIL_PROBE`` iterations (up to N more
    on the rows still running when their blocks would hold more than
    ``DENSE_FALLBACK_NUMBERS`` numbers) and a dense LU finishes the rest, in chunks of
    ``TAIL_STATES``·S/N rows (blocks no larger than that many states, or than
    ``TAIL_MIN_NUMBERS``), kept for the next solve at this point. The caps are per row, so a
    row's answer does not depend on its batch. Otherwise Richardson runs at most ``budget`` iterations (default
    ``RICHARDSON_BUDGET``) and GMRES finishes the failed
    rows from Richardson's iterate (from zero where it diverged); where their blocks hold at
    most ``DENSE_FALLBACK_NUMBERS`` numbers GMRES gets max(2N, 40) products and a dense LU
    finishes the rows it leaves (restarted GMRES stalls on operators whose eigenvalues
    surround 0, as I − J with ρ(J) > 1)."""
    S, N = b.shape
    budget = RICHARDSON_BUDGET if budget is None else budget
    steps = max(1, min(int(budget), max_iter))
    dense_tail = op.can_restrict and N <= DENSE_TAIL_MAX_ROW_SIZE
    richardson = get_solver("richardson", "linear")
    if dense_tail:
        steps = min(max_iter, max(16, N))
        x0 = _start_from_factored_rows(op, b, x0, tol=tol, atol=atol)
        probe = min(steps, TAIL_PROBE)
    else:
        probe = steps
    x, info = richardson(op, b, x0, tol=tol, atol=atol, max_iter=probe)
    if info.all_converged:
        return x, info
    rows = (~info.converged).nonzero().flatten()
    if dense_tail and probe < steps and rows.numel() * N * N > DENSE_FALLBACK_NUMBERS:
        # too many slow rows to keep their blocks: iterate them on, up to the cap
        x_rows, sub = richardson(op.restrict(rows), b.index_select(0, rows), x.index_select(0, rows), tol=tol,
                                 atol=_rows_of(atol, rows), max_iter=steps - probe)
        x, info = x.index_copy(0, rows, x_rows), merge_rows(info, rows, sub, "richardson")
        if info.all_converged:
            return x, info
        rows = (~info.converged).nonzero().flatten()
    if dense_tail:
        x_rows, sub = _dense_tail(op, b, rows, tol=tol, atol=atol)
    elif steps < max_iter:
        sane = torch.isfinite(x).all(1) & (info.residual <= row_norm(b))
        x0 = torch.where(sane[:, None], x, 0.0)
        if not op.can_restrict:
            rows = torch.arange(S, device=b.device)
        sub_op = op.restrict(rows) if op.can_restrict else op
        sub_b = b.index_select(0, rows)
        # restarted GMRES can stall (I − J with eigenvalues around 0, ρ(J) > 1); where the
        # blocks fit, a dense LU finishes what N Krylov steps did not
        dense_ok = rows.numel() * N * N <= DENSE_FALLBACK_NUMBERS
        budget = max_iter - steps if not dense_ok else min(max_iter - steps, max(2 * N, 40))
        x_rows, sub = get_solver("gmres", "linear")(sub_op, sub_b, x0.index_select(0, rows),
                                                    tol=tol, atol=_rows_of(atol, rows), max_iter=budget)
        if dense_ok and not sub.all_converged:
            left = (~sub.converged).nonzero().flatten()
            dense_op = sub_op.restrict(left) if sub_op.can_restrict else sub_op
            if sub_op.can_restrict:
                x_left, fin = get_solver("dense", "linear")(dense_op, sub_b.index_select(0, left), tol=tol,
                                                            atol=_rows_of(atol, rows.index_select(0, left)))
            else:
                x_left, fin = get_solver("dense", "linear")(dense_op, sub_b, tol=tol, atol=_rows_of(atol, rows))
            if not sub_op.can_restrict:
                x_left, fin = x_left.index_select(0, left), _select_rows(fin, left)
            x_rows, sub = x_rows.index_copy(0, left, x_left), merge_rows(sub, left, fin, "gmres")
    else:
        return x, info
    return x.index_copy(0, rows, x_rows), merge_rows(info, rows, sub, ITERATIVE_AUTO)


def _factored(op: BoundOperator) -> list[tuple[Tensor, object]]:
    """The row blocks of ``op``'s linearization that a dense tail has factored, as
    ``(rows, restricted linearization holding their LU)``: every solve at the same point (the
    derivative solves of one step, with ``A`` or ``Aᵀ``) reuses them, and the rows that are slow
    for one right-hand side are slow for the others (their rate is ρ of their own block)."""
    return op.lin.__dict__.setdefault("factored_rows", [])


def _start_from_factored_rows(op: BoundOperator, b: Tensor, x0: Tensor | None, *, tol: float, atol):
    """The initial guess with the rows already factored at this point solved directly
    (Richardson then stops them at iteration 0)."""
    pieces = _factored(op)
    if not pieces:
        return x0
    dense = get_solver("dense", "linear")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    for rows, sub in pieces:
        x_rows, _ = dense(BoundOperator(sub, op.transposed), b.index_select(0, rows), tol=tol, atol=_rows_of(atol, rows))
        x.index_copy_(0, rows, x_rows)
    return x


def _dense_tail(op: BoundOperator, b: Tensor, rows: Tensor, *, tol: float, atol):
    """Dense LU solves of the rows ``rows`` that Richardson left: blocks already factored at
    this point are reused, the others are built and factored in chunks of ``TAIL_STATES``·S/N
    rows and kept for the next solve at this point. Returns their solutions and statistics
    in the order of ``rows``."""
    S, N = b.shape
    dense = get_solver("dense", "linear")
    pieces = _factored(op)
    position = torch.full((S,), -1, dtype=torch.long, device=b.device)
    position[rows] = torch.arange(rows.numel(), device=b.device)
    parts: list[tuple[Tensor, Tensor, SolveInfo]] = []  # (rows, solutions, statistics)
    for known, sub in list(pieces):
        sel = (position[known] >= 0).nonzero().flatten()
        if sel.numel():
            x_b, info_b = dense(BoundOperator(sub, op.transposed), b.index_select(0, known), tol=tol,
                                atol=_rows_of(atol, known))
            parts.append((known[sel], x_b[sel], _select_rows(info_b, sel)))
    taken = torch.zeros(S, dtype=torch.bool, device=b.device)
    for r, _, _ in parts:
        taken[r] = True
    chunk = max(TAIL_STATES * S // N, TAIL_MIN_NUMBERS // (N * N), 1)
    for r in rows[~taken[rows]].split(chunk):
        sub_op = op.restrict(r)
        x_b, info_b = dense(sub_op, b.index_select(0, r), tol=tol, atol=_rows_of(atol, r))
        pieces.append((r, sub_op.lin))
        parts.append((r, x_b, info_b))
    order = torch.argsort(position[torch.cat([r for r, _, _ in parts])])
    x_rows = torch.cat([x for _, x, _ in parts]).index_select(0, order)
    return x_rows, _select_rows(_cat_infos([i for _, _, i in parts]), order, keep_trace=True)


def _cat_infos(infos: list[SolveInfo]) -> SolveInfo:
    """Statistics of consecutive row blocks solved separately; their traces are kept when
    they have equally many steps."""
    if len({len(i.trace) for i in infos}) == 1:
        return concat_rows(infos)
    return concat_rows([_select_rows(i, torch.arange(i.iterations.numel(), device=i.iterations.device)) for i in infos])


def _select_rows(info, rows: Tensor, keep_trace: bool = False):
    """Statistics of the rows ``rows`` of a solve (its trace is dropped, or with
    ``keep_trace`` reordered when ``rows`` is a permutation)."""
    trace = ResidualTrace(rows.numel(), info.residual.dtype, info.residual.device)
    if keep_trace:
        trace = trace.extended(info.trace, torch.argsort(rows))
    return replace(info, iterations=info.iterations[rows], residual=info.residual[rows],
                   rel_residual=info.rel_residual[rows], converged=info.converged[rows], trace=trace)


def _rows_of(atol, rows: Tensor):
    """A per-row ``atol`` (a rescaled solve's) restricted to ``rows``; a number as it is."""
    return atol.index_select(0, rows) if isinstance(atol, Tensor) else atol


def _legacy_batched(t) -> bool:
    return isinstance(t, Tensor) and torch._C._functorch.is_legacy_batchedtensor(t)


def _legacy_vmap_apply(op: LinearOperator, b: Tensor, params) -> Tensor:
    """The solve under PyTorch's legacy vmap, which batched-gradient entry points use
    (``autograd.grad(..., is_grads_batched=True)``, ``autograd.functional.jacobian(...,
    vectorize=True)``, ``gradcheck(check_batched_grad=True)``); it does not dispatch to an
    ``autograd.Function``'s ``vmap`` rule. The innermost vmap level is unwrapped (differentiably:
    ``_remove_batch_dim``/``_add_batch_dim`` carry gradients) and the stack of systems is one
    differentiable solve of the physical tensors with a :class:`VmappedOperator` (one
    linearization, one LU, shared when only ``b`` carries the batch). The solve node then saves
    plain tensors, so its own derivatives (``create_graph=True``, then a further gradient) are
    again exact solves."""
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()

    def unwrap(t: Tensor) -> tuple[Tensor, int | None]:
        if not _legacy_batched(t):
            return t, None
        # a tensor not batched at this level comes back expanded to the requested size 0
        out = torch._remove_batch_dim(t, level, 0, 0)
        return (out, 0) if out.shape[0] or not t.numel() else (t, None)

    b_u, b_dim = unwrap(b)
    unwrapped = [unwrap(p) for p in params]
    sizes = {t.shape[0] for t, d in [(b_u, b_dim), *unwrapped] if d is not None}
    if len(sizes) != 1:
        raise RuntimeError("deqdiff linear solve: inputs batched at different sizes under vmap")
    size = sizes.pop()
    if b_dim is None:
        b_u = b_u.expand(size, *b_u.shape)
    p_u, p_dims = zip(*unwrapped) if unwrapped else ((), ())
    x = _apply(VmappedOperator(op, p_dims, size), b_u, tuple(p_u))
    return torch._add_batch_dim(x, 0, level)


def _apply(op: LinearOperator, b: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``A(params)⁻¹ b`` through :class:`_LinearSolve`, or :func:`_legacy_vmap_apply` under
    the legacy vmap of the batched-gradient entry points."""
    if _legacy_batched(b) or any(_legacy_batched(p) for p in params):
        return _legacy_vmap_apply(op, b, params)
    return _LinearSolve.apply(op, b, *params)


class _LinearSolve(torch.autograd.Function):
    @staticmethod
    def forward(op: LinearOperator, b: Tensor, *params: Tensor) -> Tensor:
        return _numeric_solve(op, b, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, _, *params = inputs
        ctx.op = op
        ctx.save_for_backward(output, *params)
        ctx.save_for_forward(output, *params)

    @staticmethod
    def backward(ctx, x_bar: Tensor):
        x, *params = ctx.saved_tensors
        u = _apply(ctx.op.T, x_bar, params)
        p_bar = _param_cotangent(ctx.op, u, x, params, ctx.needs_input_grad[2:])
        return (None, u, *p_bar)

    @staticmethod
    def jvp(ctx, _, b_dot: Tensor | None, *p_dot: Tensor | None) -> Tensor:
        forbid_nested_forward()
        x, *params = ctx.saved_tensors
        p_dot = live_tangents(p_dot)
        rhs = b_dot if b_dot is not None else torch.zeros_like(x)
        if any(t is not None for t in p_dot):
            rhs = rhs - _operator_tangent(ctx.op, x, params, p_dot)
        return _apply(ctx.op, rhs, params)

    @staticmethod
    def vmap(info, in_dims, op, b, *params):
        size = info.batch_size
        b_dim, p_dims = in_dims[1], in_dims[2:]
        b = b.movedim(b_dim, 0) if b_dim is not None else b.expand(size, *b.shape)
        params = tuple(p if d is None else p.movedim(d, 0) for p, d in zip(params, p_dims))
        op_v = VmappedOperator(op, p_dims, size)
        return _LinearSolve.apply(op_v, b, *params), 0


def _param_cotangent(op, u, x, params, needs) -> list[Tensor | None]:
    """``p̄ = −∂_p ⟨u, A(p) x⟩`` for the parameters that need a gradient (partial in p; the
    result keeps its dependence on ``u``, ``x`` and ``p`` for the next order)."""
    idx = [i for i, n in enumerate(needs) if n]
    if not idx:
        return [None] * len(params)
    form = lambda u, x, *p: -op.bilinear(u, x, *p)  # noqa: E731
    grads = vjp(form, (u, x, *params), [2 + i for i in idx], torch.ones((), dtype=x.dtype, device=x.device))
    out: list[Tensor | None] = [None] * len(params)
    for i, g in zip(idx, grads):
        out[i] = g
    return out


def _operator_tangent(op, x, params, p_dot) -> Tensor:
    """``(∂_p A(p) x)·ṗ`` (with ``Aᵀ`` for a transposed operator)."""
    idx = [i for i, t in enumerate(p_dot) if t is not None]
    return jvp_by_vjp(op.oriented_apply, (x, *params), [1 + i for i in idx], [p_dot[i] for i in idx])


def solve_with_operator(op: LinearOperator, b: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Differentiable ``A(params)⁻¹ b`` for an operator object (engine-internal entry)."""
    return _apply(op, b, params)


def linear_solve(
    matvec: Callable[..., Tensor],
    b: Tensor,
    *params: Tensor,
    solver: str | Callable = "auto",
    tol: float = 1e-8,
    atol: float = 0.0,
    max_iter: int = 1000,
    batch_ndim: int = 0,
    on_fail: str = "warn",
    return_info: bool = False,
    **options,
):
    """Solve ``A(params) x = b`` where ``A(params) v = matvec(v, *params)`` is linear in ``v``.

    ``x`` is differentiable to every order in ``b`` and ``params`` (reverse, forward,
    ``torch.func`` transforms): its derivatives are linear solves with ``Aᵀ``/``A``.
    The leading ``batch_ndim`` dims of ``b`` index independent systems (``A`` must not mix
    them); each stops when ``‖b − A x‖₂ ≤ atol + tol·‖b‖₂``. ``solver`` is a registered
    linear solver ("gmres", "bicgstab", "richardson", "anderson", "dense", ...) or "auto"
    (dense LU for rows of at most 64 unknowns, else Richardson with a GMRES fallback; see
    ``_pick_solver`` for what it does on fixed points with ``row_params``).
    With ``return_info=True`` also returns the list of ``SolveInfo`` of this solve and of
    the derivative solves run later through it.
    """
    if not isinstance(b, Tensor) or not b.is_floating_point():
        raise TypeError(f"b must be a floating-point tensor, got {type(b).__name__}"
                        + (f" of dtype {b.dtype}" if isinstance(b, Tensor) else ""))
    check_solve_options(b.dtype, tol=tol, atol=atol, max_iter=max_iter, on_fail=on_fail)
    records: list = []
    config = dict(
        solver=solver, tol=tol, atol=atol, max_iter=max_iter, on_fail=on_fail,
        options=options, kind="linear", record=records.append,
    )
    op = FunctionOperator(matvec, b.shape, batch_ndim, config=config)
    x = _apply(op, b, params)
    return (x, records) if return_info else x
