"""Shared conventions of every solver: the batched state layout, the stopping rule, the
statistics object and the registry.

Layout. Every solver works on a 2-D state ``(S, N)``: ``S`` independent samples (rows) of
``N`` unknowns. Rows never mix: every per-iteration coefficient (Anderson weights, Broyden
updates, Krylov bases, step sizes) is computed per row, a row stops being updated once it
has converged, and so a batch gives the same answer as solving each row alone.

Stopping rule (per row ``s``).
* forward solves of ``z = g(z)``: ``‖g(z)_s − z_s‖₂ ≤ atol + tol·scale_s`` with
  ``scale_s = ‖g(z)_s‖₂`` (the relative residual of Nguyen 2022, eq. 4.2) unless a fixed
  ``scale`` is given;
* linear solves of ``A x = b``: ``‖b_s − (A x)_s‖₂ ≤ atol + tol·‖b_s‖₂``.
The iterate whose residual met the rule is the one returned.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = [
    "SolveInfo",
    "ResidualTrace",
    "ConvergenceError",
    "ConvergenceWarning",
    "Tracker",
    "register_solver",
    "get_solver",
    "available_solvers",
    "report_failure",
    "compaction",
    "compact_rows_",
    "compact_now",
    "static_rows",
    "stopping_bound",
    "merge_rows",
    "concat_rows",
]


class ConvergenceError(RuntimeError):
    """A solve stopped at ``max_iter`` without meeting its tolerance."""

    def __init__(self, message: str, info: "SolveInfo"):
        super().__init__(message)
        self.info = info


class ConvergenceWarning(RuntimeWarning):
    """Warning category for solves that did not meet their tolerance."""


class ResidualTrace:
    """Residual history of a batched solve, stored sparsely.

    Iteration ``k`` records the residuals of only the rows it updated (a converged row keeps
    its last value), so memory is Σ_s iterations_s instead of K·S; :meth:`dense` expands to
    the ``(K, S)`` table (rows not yet recorded hold ``inf``). A step may store the scale of
    its relative residuals instead of their values; they are divided out on access."""

    def __init__(self, S: int, dtype: torch.dtype, device: torch.device):
        self.S, self.dtype, self.device = S, dtype, device
        # (rows or None, absolute residuals, relative residuals or None, their scale or None)
        self._steps: list[tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]] = []

    def append(self, rows: Tensor | None, res_abs: Tensor, res_rel: Tensor | None = None,
               scale: Tensor | None = None) -> None:
        """Record iteration residuals of ``rows`` (indices; ``None`` = every row): the relative
        ones as ``res_rel``, or as ``res_abs / scale`` computed when read."""
        if res_rel is None and scale is None:
            raise ValueError("ResidualTrace.append needs res_rel or scale")
        self._steps.append((None if rows is None else rows.to(torch.int32), res_abs, res_rel, scale))

    def step(self, k: int) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(rows, absolute, relative)`` residuals recorded at step ``k``."""
        rows, a, q, sc = self._steps[k]
        return rows, a, (_relative(a, sc) if q is None else q)

    @classmethod
    def from_dense(cls, abs_trace: Tensor, rel_trace: Tensor) -> "ResidualTrace":
        trace = cls(abs_trace.shape[1], abs_trace.dtype, abs_trace.device)
        for a, r in zip(abs_trace, rel_trace):
            trace.append(None, a, r)
        return trace

    def __len__(self) -> int:
        return len(self._steps)

    def dense(self, which: int = 0) -> Tensor:
        """``(K, S)`` table of absolute (``which=0``) or relative (``which=1``) residuals."""
        out = torch.full((len(self._steps), self.S), math.inf, dtype=self.dtype, device=self.device)
        for k in range(len(self._steps)):
            if k:
                out[k] = out[k - 1]
            rows, *vals = self.step(k)
            if rows is None:
                out[k] = vals[which]
            else:
                out[k].index_copy_(0, rows.long(), vals[which])
        return out

    def first(self, which: int = 0) -> Tensor:
        """``(S,)`` residuals at each row's first recorded iteration, absolute (``which=0``) or
        relative (``which=1``); ``inf`` for rows never recorded. Reads only the steps it needs."""
        out = torch.full((self.S,), math.inf, dtype=self.dtype, device=self.device)
        seen = torch.zeros(self.S, dtype=torch.bool, device=self.device)
        for k in range(len(self._steps)):
            rows, *vals = self.step(k)
            if rows is None:
                return torch.where(seen, out, vals[which])
            idx = rows.long()
            new = ~seen[idx]
            out[idx[new]] = vals[which][new]
            seen[idx] = True
            if bool(seen.all()):
                break
        return out

    def extended(self, other: "ResidualTrace", rows: Tensor) -> "ResidualTrace":
        """This trace followed by ``other``, a trace over the subset ``rows`` of the batch."""
        trace = ResidualTrace(self.S, self.dtype, self.device)
        rows32 = rows.to(torch.int32)
        trace._steps = self._steps + [(rows32 if r is None else rows32[r.long()], a, q, sc)
                                      for r, a, q, sc in other._steps]
        return trace

    def after(self, res_abs: Tensor, scale: Tensor) -> "ResidualTrace":
        """This trace preceded by one step of every row (absolute residuals ``res_abs``, their
        scale ``scale``): a solve that started one iterate in reports the iterate it skipped."""
        trace = ResidualTrace(self.S, self.dtype, self.device)
        trace._steps = [(None, res_abs, None, scale), *self._steps]
        return trace

    def scaled(self, factor: float | Tensor) -> "ResidualTrace":
        """The same trace with absolute residuals divided by ``factor`` (a number, or one
        per row of the batch); relative residuals are unchanged."""
        if not isinstance(factor, Tensor) and factor == 1.0:
            return self
        trace = ResidualTrace(self.S, self.dtype, self.device)
        for rows, a, q, sc in self._steps:
            f = factor if not isinstance(factor, Tensor) or rows is None else factor[rows.long()]
            trace._steps.append((rows, a / f, q, None if sc is None else sc / f))
        return trace


@dataclass
class SolveInfo:
    """Statistics of one solve (forward, or one derivative solve).

    ``iterations``, ``residual``, ``rel_residual`` and ``converged`` are per row ``(S,)``;
    ``abs_trace``/``rel_trace`` are ``(K, S)``: the residual of each row at every iteration
    (a converged row keeps its final value), expanded on access from the sparse ``trace``;
    ``trajectory`` holds the iterates ``z^[k]`` (shape ``(S, N)`` each) when requested.
    """

    solver: str
    kind: str
    tol: float
    atol: float
    iterations: Tensor
    residual: Tensor
    rel_residual: Tensor
    converged: Tensor
    trace: ResidualTrace
    trajectory: list[Tensor] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def abs_trace(self) -> Tensor:
        return self.trace.dense(0)

    @property
    def rel_trace(self) -> Tensor:
        return self.trace.dense(1)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    @property
    def max_iterations(self) -> int:
        return int(self.iterations.max()) if self.iterations.numel() else 0

    def summary(self) -> str:
        ok = int(self.converged.sum())
        return (
            f"{self.kind} solve ({self.solver}): {ok}/{self.converged.numel()} rows converged, "
            f"max residual {self.max_residual:.3e} (rel {float(self.rel_residual.max()):.3e}), "
            f"max iterations {self.max_iterations}, tol {self.tol:g}, atol {self.atol:g}"
        )


def stopping_bound(tol: float, atol: float | Tensor, scale: Tensor) -> Tensor:
    """The stopping rule's bound ``atol + tol·scale`` per row: a residual meets it when
    ``res ≤ bound``. Capped at the largest finite number: an overflowed iterate has res = scale
    = inf and inf ≤ tol·inf would hold; NaN compares false either way."""
    bound = tol * scale if isinstance(atol, float) and atol == 0.0 else atol + tol * scale
    return bound.clamp(max=torch.finfo(bound.dtype).max)


def _relative(res_abs: Tensor, scale: Tensor) -> Tensor:
    return res_abs / scale.clamp_min(torch.finfo(scale.dtype).tiny)


class Tracker:
    """Per-row convergence bookkeeping shared by every solver loop.

    ``update(k, z, res_abs, scale)`` records the residual of iterate ``z`` (iteration
    ``k``), freezes rows that just met ``atol + tol·scale`` (their answer is copied into
    ``result``) and returns the boolean mask of rows still running. ``atol`` is a number or
    one per row ``(S,)`` (a problem rescaled row by row, :mod:`deqdiff.solvers.scaling`).

    ``static`` (optional, ``(S,)`` bool): rows known to sit at their answer from the start,
    whatever the iterations do to them — the rows with ``b = 0`` of a linear solve started
    at 0. They count as converged at iteration 0 with residual 0 and return their start,
    and they do not keep the other rows off the fast path below.

    While no other row has converged (most iterations of most solves), an update costs no
    masks and no copies: the result, iteration count and relative residuals refer to the
    latest iterate and are written out only when a row freezes or the statistics are read.
    Solvers therefore never modify an iterate in place after handing it to ``update``.
    """

    def __init__(self, z0: Tensor, tol: float, atol: float | Tensor, store_trajectory: bool = False,
                 static: Tensor | None = None):
        S = z0.shape[0]
        self.tol = float(tol)
        self.atol = atol if isinstance(atol, Tensor) else float(atol)
        self._z0 = z0
        self._result, self._owned = z0, False  # a reference to the latest iterate until a row freezes
        # after that: the latest iterate of the running rows (iterate, its rows, their rows in the
        # batch), written into the result when read: a running row's value is replaced at every
        # iteration, so only the rows that freeze are copied as they go
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None
        self.static = static
        self.n_static = 0 if static is None else int(static.sum())
        if not self.n_static:
            self.static = None
        self.done = torch.zeros(S, dtype=torch.bool, device=z0.device) if self.static is None else self.static.clone()
        self._iterations = torch.zeros(S, dtype=torch.long, device=z0.device)
        self._residual = torch.full((S,), math.inf, dtype=z0.dtype, device=z0.device)
        self._rel = torch.full((S,), math.inf, dtype=z0.dtype, device=z0.device)
        self._k: int | Tensor | None = None  # iteration of a whole-batch update not yet in _iterations
        self._scale: Tensor | None = None  # its scale: relative residuals not yet in _rel
        self._bound: tuple[Tensor, Tensor] | None = None  # (scale, atol + tol·scale) of the last update
        self.trace = ResidualTrace(S, z0.dtype, z0.device)
        self.trajectory: list[Tensor] | None = [] if store_trajectory else None
        self.n_done = self.n_static  # rows frozen so far: one host sync per update answers every later question

    def update(self, k: int, z: Tensor, res_abs: Tensor, scale: Tensor, rows: Tensor | None = None) -> Tensor:
        """Record iterate ``z`` of iteration ``k`` (an int, or per row); return the running
        mask of its rows.

        ``rows`` (indices into the full batch) says which rows ``z``, ``res_abs`` and
        ``scale`` hold when a solver has compacted its state to the rows still running
        (:func:`compaction`); ``None`` means all rows."""
        if rows is None and self.n_done == self.n_static:
            # every row still runs: keep references, write nothing out
            self._result, self._owned = z, False
            self._residual, self._scale, self._k = res_abs, scale, k
            self.trace.append(None, res_abs, scale=scale)
            met = self._met(res_abs, scale, None)
            self.done = met if self.static is None else met | self.static
            running = ~self.done
        else:
            self._settle(own=True, pending=False)  # the result is ours; the pending iterate is superseded
            # one nonzero (one host sync) for the rows of z still live; gathers by index from there
            live = (~self.done if rows is None else ~self.done[rows]).nonzero().squeeze(1)
            keep = live if rows is None else rows.index_select(0, live)
            res_abs, scale = res_abs.index_select(0, live), scale.index_select(0, live)
            rel = _relative(res_abs, scale)
            self._residual = self._residual.index_put((keep,), res_abs)
            self._rel = self._rel.index_put((keep,), rel)
            if isinstance(k, int):
                self._iterations = self._iterations.index_fill(0, keep, k)
            else:
                kk = torch.as_tensor(k, device=keep.device)
                self._iterations = self._iterations.index_put((keep,), kk.index_select(0, live) if kk.ndim else kk)
            self.done = self.done.index_put((keep,), self._met(res_abs, scale, keep))
            self.trace.append(keep, res_abs, rel)
            self._pending = (z, live, keep)
            running = ~self.done if rows is None else ~self.done[rows]
        self.n_done = int(self.done.sum())
        if self.trajectory is not None:
            self.trajectory.append(self.result.clone())
        return running

    def _settle(self, own: bool = False, pending: bool = True) -> None:
        """Write the last whole-batch update's iteration count and relative residuals out and,
        with ``own``, take a copy of the result (rows are about to be frozen in it) and write the
        pending iterate of the running rows into it (unless ``pending=False``: a new one replaces it)."""
        if self._k is not None:
            if isinstance(self._k, int):
                self._iterations.fill_(self._k)
            else:
                self._iterations = torch.as_tensor(self._k, device=self._iterations.device).expand_as(
                    self._iterations).clone()
            self._k = None
        if self._scale is not None:
            self._rel = _relative(self._residual, self._scale)
            self._scale = None
        if own and not self._owned:
            self._result, self._owned = self._result.clone(), True
        if self._pending is not None:
            z, src, dst = self._pending
            if not pending:  # only the rows that froze at that iteration keep its value
                gone = self.done.index_select(0, dst).nonzero().squeeze(1)
                src, dst = src.index_select(0, gone), dst.index_select(0, gone)
            if dst.numel():
                self._result.index_copy_(0, dst, z.index_select(0, src))
            self._pending = None

    def _met(self, res_abs: Tensor, scale: Tensor, rows: Tensor | None) -> Tensor:
        if self._bound is not None and self._bound[0] is scale and rows is None:
            return res_abs <= self._bound[1]  # a fixed scale (linear solves): the bound is known
        atol = self.atol
        if isinstance(atol, Tensor) and rows is not None:
            atol = atol[rows]
        bound = stopping_bound(self.tol, atol, scale)
        if rows is None:
            self._bound = (scale, bound)
        return res_abs <= bound

    def residual_norm(self, F: Tensor, rows: Tensor | None = None) -> Tensor:
        """``row_norm`` of the residuals ``F`` of the rows ``rows`` (None: all), not recomputing
        the static rows, whose norm is not used."""
        return row_norm(F, self.static if rows is None else None)

    def note(self, res_abs: Tensor, scale: Tensor) -> None:
        """Record residual estimates of the running rows in the traces, without freezing
        any row (for solvers whose iterate is formed only now and then, e.g. GMRES)."""
        rel = _relative(res_abs, scale)
        idx = (~self.done).nonzero().flatten()
        if idx.numel() == self.done.numel():
            self.trace.append(None, res_abs.clone(), rel.clone())
        else:
            self.trace.append(idx, res_abs[idx], rel[idx])

    def _static_rows(self, t: Tensor, value) -> Tensor:
        return t if self.static is None else t.masked_fill(self.static, value)

    @property
    def result(self) -> Tensor:
        """The answer per row: the iterate at which each row met the rule (the latest for rows
        still running); static rows keep their start."""
        if self._pending is not None:
            self._settle()
        r = self._result
        if r is self._z0 and not self._owned:
            r = r.clone()  # never hand the caller's own start back as the answer
        if self.static is not None:
            r = torch.where(self.static.reshape(-1, *[1] * (r.ndim - 1)), self._z0, r)
        return r

    @property
    def residual(self) -> Tensor:
        return self._static_rows(self._residual, 0.0)

    @property
    def rel_residual(self) -> Tensor:
        self._settle()
        return self._static_rows(self._rel, 0.0)

    @property
    def iterations(self) -> Tensor:
        self._settle()
        return self._static_rows(self._iterations, 0)

    @property
    def finished(self) -> bool:
        return self.n_done == self.done.numel()

    def info(self, solver: str, kind: str, **extra) -> SolveInfo:
        return SolveInfo(
            solver=solver,
            kind=kind,
            tol=self.tol,
            atol=self.atol,
            iterations=self.iterations,
            residual=self.residual,
            rel_residual=self.rel_residual,
            converged=self.done.clone(),
            trace=self.trace,
            trajectory=self.trajectory,
            extra=dict(extra),
        )


def compaction(g: Callable) -> bool:
    """Whether ``g`` can be evaluated on a subset of rows, ``g(z_sub, rows=idx)``.

    Forward solvers that support it shrink their per-row state to the rows still running
    once a quarter of them have converged, so converged samples cost nothing more (the
    engine offers it when it knows which parameters are per-row: ``row_params``)."""
    return bool(getattr(g, "row_subsets", False))


def static_rows(g: Callable) -> Tensor | None:
    """Rows of ``g``'s state that stay at their answer whatever the iterations do (``(S,)``
    bool, or ``None``): a linear solve started at 0 marks its rows with ``b = 0`` so, and the
    solver's :class:`Tracker` then skips them (:func:`deqdiff.solvers.linear.forward_as_linear`)."""
    return getattr(g, "static_rows", None)


#: shrink the state when fewer than this share of its rows is still running
COMPACT_BELOW = 0.75


def compact_now(g: Callable, k: int, running: Tensor) -> bool:
    """Whether a solver that can (:func:`compaction`) should shrink its state after iteration
    ``k``: fewer than ``COMPACT_BELOW`` of its rows run, and ``k`` ≥ ``g.compact_from`` (a map
    whose restriction costs as much as a few iterations, as a linearization that must be
    rebuilt on the rows kept, sets it: most of its solves end within a few iterations, and
    those that run longer still shrink)."""
    return k >= getattr(g, "compact_from", 0) and int(running.sum()) < COMPACT_BELOW * running.numel()


def compact_rows_(t: Tensor, keep: Tensor) -> Tensor:
    """``t[keep]`` for sorted row indices ``keep``, gathered in place into the first
    ``len(keep)`` rows of ``t`` (returned as that view): since ``keep[i] ≥ i``, a chunk's
    sources lie at or after every row written so far, so the large per-row histories of a
    solver shrink without a second copy of them."""
    n = keep.numel()
    chunk = max(256, t.shape[0] // 8)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        t[i:j] = t.index_select(0, keep[i:j])
    return t[:n]


def merge_rows(info: SolveInfo, rows: Tensor, sub: SolveInfo, solver: str) -> SolveInfo:
    """Statistics of a solve whose rows ``rows`` (left unconverged) were then finished by a
    second solve ``sub`` run on those rows only: iterations add up, the residuals and the
    converged flags are ``sub``'s, its trace follows."""
    return replace(
        info,
        solver=solver,
        iterations=info.iterations.index_add(0, rows, sub.iterations),
        residual=info.residual.index_copy(0, rows, sub.residual),
        rel_residual=info.rel_residual.index_copy(0, rows, sub.rel_residual),
        converged=info.converged.index_copy(0, rows, sub.converged),
        trace=info.trace.extended(sub.trace, rows),
        extra={**info.extra, "finished_by": sub.solver, "finished_rows": rows.numel(),
               **{f"{sub.solver}_{k}": v for k, v in sub.extra.items()}},
    )


def concat_rows(infos: list[SolveInfo]) -> SolveInfo:
    """One solve's statistics from solves of consecutive row blocks with the same number
    of trace steps (e.g. a dense solve done block by block)."""
    first = infos[0]
    if len(infos) == 1:
        return first
    if len({len(i.trace) for i in infos}) != 1:
        raise ValueError("concat_rows needs solves with equally long traces")
    sizes = [i.iterations.numel() for i in infos]
    trace = ResidualTrace(sum(sizes), first.trace.dtype, first.trace.device)
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    for k in range(len(first.trace)):
        idx, a, q = [], [], []
        for info, off, n in zip(infos, offsets, sizes):
            r, ak, qk = info.trace.step(k)
            idx.append(torch.arange(n, device=ak.device) + off if r is None else r.long() + off)
            a.append(ak)
            q.append(qk)
        trace.append(torch.cat(idx), torch.cat(a), torch.cat(q))
    cat = lambda name: torch.cat([getattr(i, name) for i in infos])  # noqa: E731
    return replace(first, iterations=cat("iterations"), residual=cat("residual"),
                   rel_residual=cat("rel_residual"), converged=cat("converged"), trace=trace,
                   trajectory=None)


#: why a row gave up before ``max_iter`` (``info.extra["stopped"]`` of Newton–Krylov)
_STOP_REASONS = {1: "no descent direction", 2: "stagnation", 3: "a non-finite residual"}


def _advice(info: SolveInfo, bad: Tensor) -> str:
    """What to change: more iterations help only rows that ran out of them."""
    stopped = info.extra.get("stopped")
    if isinstance(stopped, Tensor) and bool((stopped[bad] > 0).all()):
        reasons = sorted({_STOP_REASONS.get(int(r), f"reason {int(r)}") for r in stopped[bad].unique()})
        return (f"Every failed row stopped early ({', '.join(reasons)}), so a larger max_iter will not help: "
                f"loosen tol, start closer, or choose another solver.")
    return "Increase max_iter, loosen tol, or choose another solver."


def report_failure(info: SolveInfo, on_fail: str, what: str) -> None:
    """Raise or warn (``on_fail`` = ``"raise"``/``"warn"``/``"ignore"``) when ``info`` has
    rows that did not converge; the message names the residual and iterations reached."""
    if info.all_converged or on_fail == "ignore":
        return
    bad = (~info.converged).nonzero().flatten()
    worst = int(bad[info.residual[bad].argmax()])
    msg = (
        f"{what} did not converge: {bad.numel()}/{info.converged.numel()} rows above tolerance "
        f"after {info.max_iterations} iterations of '{info.solver}'; worst row {worst} has "
        f"residual {float(info.residual[worst]):.3e} (relative {float(info.rel_residual[worst]):.3e}) "
        f"vs tol={info.tol:g}, atol={info.atol:g}. " + _advice(info, bad)
    )
    if on_fail == "raise":
        raise ConvergenceError(msg, info)
    if on_fail == "warn":
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)
        return
    raise ValueError(f"on_fail must be 'raise', 'warn' or 'ignore', got {on_fail!r}")


class ForwardSolver(Protocol):
    """``solver(g, z0, *, tol, atol, max_iter, scale=None, store_trajectory=False, **options)
    -> (z, SolveInfo)`` for ``z = g(z)`` on ``(S, N)`` states (called under ``no_grad``)."""

    def __call__(self, g: Callable[[Tensor], Tensor], z0: Tensor, **kwargs) -> tuple[Tensor, SolveInfo]: ...


class LinearSolver(Protocol):
    """``solver(op, b, x0, *, tol, atol, max_iter, **options) -> (x, SolveInfo)`` for
    ``A x = b``; ``op.mv(v)`` applies ``A`` row-wise to ``(S, N)`` and ``op.blocks()``
    returns the dense per-row matrices ``(S, N, N)`` (only dense solvers call it)."""

    def __call__(self, op, b: Tensor, x0: Tensor | None, **kwargs) -> tuple[Tensor, SolveInfo]: ...


_REGISTRY: dict[str, dict[str, Callable]] = {"forward": {}, "linear": {}}


def register_solver(name: str, kind: str = "forward", *, overwrite: bool = False):
    """Decorator registering a forward (``kind="forward"``) or linear (``kind="linear"``)
    solver under ``name`` so that ``fixed_point(..., solver=name)`` or
    ``linear_solve(..., solver=name)`` finds it."""
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be 'forward' or 'linear', got {kind!r}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY[kind] and not overwrite:
            raise ValueError(f"a {kind} solver named {name!r} is already registered")
        _REGISTRY[kind][name] = fn
        return fn

    return deco


def get_solver(name: str | Callable, kind: str = "forward") -> Callable:
    if callable(name):
        return name
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} solver {name!r}; available: {sorted(_REGISTRY[kind])}"
        ) from None


def available_solvers(kind: str = "forward") -> list[str]:
    return sorted(_REGISTRY[kind])


def row_norm(v: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Euclidean norm of each row of an ``(S, N)`` tensor, accurate at every representable
    scale: a sum of squares underflows below √(tiny/ε) and overflows above √max, so rows
    whose norm falls outside that band are recomputed as ``m·‖v/m‖`` with ``m = max|v|``
    (LAPACK's nrm2 idea). The common case costs one reduction of the norms; only the rows
    outside the band are gathered and recomputed, and exactly zero rows (a zero start, a
    zero right-hand side) keep their norm 0 without rescaling. ``ignore`` (``(S,)`` bool,
    optional) marks rows whose norm the caller does not use (e.g. a :class:`Tracker`'s static
    rows): they are not recomputed, whatever their scale."""
    n = torch.linalg.vector_norm(v, dim=1)
    if not v.is_floating_point() or v.numel() == 0:
        return n
    lo, hi = _norm_band(v.dtype)
    # one reduction: this runs at every iteration of every solve
    band = n if ignore is None else n.masked_fill(ignore, 1.0)
    least, most = _extremes(band)
    if least >= lo and most <= hi:
        return n
    if least == 0.0 and most <= hi:  # zero norms: exactly zero rows (a zero start or right-hand side)?
        zero = v.detach().abs().sum(dim=1) == 0  # (any(dim=1) costs 6× this reduction on CPU)
        ignore = zero if ignore is None else ignore | zero
        if _extremes(n.masked_fill(ignore, 1.0))[0] >= lo:
            return n  # every other row is inside the band
    bad = (n < lo) | (n > hi)
    bad = (bad if ignore is None else bad & ~ignore).nonzero().squeeze(1)
    vb = v.index_select(0, bad)
    m = vb.abs().amax(dim=1)
    ok = torch.isfinite(m) & (m > 0)  # 0: an exactly zero row; inf/NaN: the norm is already inf/NaN
    safe = m * torch.linalg.vector_norm(vb / torch.where(ok, m, 1.0)[:, None], dim=1)
    return n.index_put((bad,), torch.where(ok, safe, n.index_select(0, bad)))


def _extremes(t: Tensor) -> tuple[float, float]:
    least, most = torch.aminmax(t.detach() if t.requires_grad else t)
    return float(least), float(most)


def _norm_band(dtype: torch.dtype) -> tuple[float, float]:
    fi = torch.finfo(dtype)
    return math.sqrt(fi.tiny / fi.eps), math.sqrt(fi.max) / 4
