"""Linear operators A(p) for the differentiable linear solve.

An operator is a linear map ``v ↦ A(p) v`` on tensors of a fixed ``shape`` whose leading
``batch_ndim`` dimensions index independent rows (``A`` is block diagonal over them). It
holds structure, never tensors, and serves two masters:

* autodiff needs ``A(p) v`` as a differentiable function of ``v`` and ``p``: ``apply``;
* the solvers need numbers: ``linearize(params)`` returns a :class:`Linearization` — the
  products ``A v`` and ``Aᵀ u`` at fixed parameter values, built once (one linearization
  of ``f`` for a fixed point) and reused by every iteration, plus dense blocks and a batched
  LU on demand. It is cached on the operator and shared with ``A.T``, so all derivative
  solves at one fixed point reuse the same work.

Tensors reach the numerics only through ``linearize(params)`` called from a solve's forward,
where they are plain tensors even under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .functional import jvp_by_vjp, plain, vjp, zero_point
from .validation import is_transformed

__all__ = ["SingularOperatorError", "LinearOperator", "FunctionOperator", "FixedPointJacobian", "VmappedOperator", "Linearization"]


class Linearization:
    """``A`` at fixed numeric parameters. ``mv``/``rmv`` act on user-shaped tensors.

    Operators of the form ``A = I − J`` may also give ``cmv``/``crmv``, the products with
    ``J``/``Jᵀ`` themselves: Richardson then iterates ``x ← b + J x`` directly, without
    forming ``x − A x`` (two fewer temporaries per iteration, no cancellation)."""

    #: how a singular operator is reported (:class:`FixedPointJacobian` names the IFT)
    singular_message = "the linear operator A is singular"

    def __init__(self, shape, batch_ndim: int, mv: Callable, rmv: Callable, like: Tensor,
                 cmv: Callable | None = None, crmv: Callable | None = None):
        self.shape, self.batch_ndim = torch.Size(shape), batch_ndim
        self.rows = math.prod(self.shape[:batch_ndim])
        self.row_size = math.prod(self.shape[batch_ndim:])
        self.mv, self.rmv, self.like = mv, rmv, like
        self.cmv, self.crmv = cmv, crmv
        self._blocks: Tensor | None = None
        self._lu: tuple[Tensor, Tensor] | None = None

    def prepare(self) -> None:
        """Build what products build lazily, before they run under a transform (``vmap``)
        whose level a cached closure must not capture."""

    def blocks(self) -> Tensor:
        """Dense per-row matrices ``(S, N, N)`` of ``A``: row ``i`` of every block is ``Aᵀeᵢ``,
        so ``N`` pullbacks batched by ``vmap`` build them in one pass."""
        if self._blocks is None:
            S, N = self.rows, self.row_size
            eye = torch.eye(N, dtype=self.like.dtype, device=self.like.device)
            basis = eye[:, None, :].expand(N, S, N).reshape((N, *self.shape))
            rows = torch.func.vmap(self.rmv)(basis)
            self._blocks = rows.reshape(N, S, N).transpose(0, 1).contiguous()
        return self._blocks

    def lu(self) -> tuple[Tensor, Tensor]:
        """Batched LU of the blocks; the blocks are released once factored (dense solves
        need only the LU, and on small-width/many-row problems the blocks dominate memory)."""
        if self._lu is None:
            LU, piv, info = torch.linalg.lu_factor_ex(self.blocks())
            bad = (info > 0).nonzero().flatten()
            if bad.numel():
                raise SingularOperatorError(
                    f"{self.singular_message} (exactly singular in {bad.numel()} of {info.numel()} rows, "
                    f"first row {int(bad[0])})")
            self._lu = (LU, piv)
            self._blocks = None
        return self._lu


class SingularOperatorError(ValueError):
    """A derivative or linear solve met an exactly singular operator."""


class StackedLinearization(Linearization):
    """``size`` copies of one linearization along a new leading row dimension (many
    right-hand sides, one operator): products are vmapped, blocks and LU are the base's."""

    def __init__(self, base: Linearization, size: int):
        base.prepare()
        super().__init__(
            (size, *base.shape), base.batch_ndim + 1,
            torch.func.vmap(base.mv), torch.func.vmap(base.rmv), base.like,
        )
        self.base = base

    def blocks(self) -> Tensor:
        return self.base.blocks()

    def lu(self):
        return self.base.lu()


class BoundOperator:
    """What a linear solver sees: ``A`` (or ``Aᵀ``) on ``(S, N)`` row matrices."""

    def __init__(self, lin: Linearization, transposed: bool):
        self.lin, self.transposed = lin, transposed
        self.rows, self.row_size = lin.rows, lin.row_size

    def mv(self, v: Tensor) -> Tensor:
        fn = self.lin.rmv if self.transposed else self.lin.mv
        return fn(v.reshape(self.lin.shape)).reshape(self.rows, self.row_size)

    def complement_mv(self, v: Tensor) -> Tensor:
        """``(I − A) v`` (``J v`` for ``A = I − J``), directly where the linearization has it."""
        fn = self.lin.crmv if self.transposed else self.lin.cmv
        if fn is None:
            return v - self.mv(v)
        return fn(v.reshape(self.lin.shape)).reshape(self.rows, self.row_size)

    @property
    def can_restrict(self) -> bool:
        return hasattr(self.lin, "restrict")

    def restrict(self, rows: Tensor) -> "BoundOperator":
        """The operator on the rows ``rows`` only (re-linearized there: one evaluation of f),
        for solvers that compact their state to the rows still running."""
        return BoundOperator(self.lin.restrict(rows), self.transposed)

    def blocks(self) -> Tensor:
        """Dense blocks of the operator as applied (transposed if this is ``Aᵀ``)."""
        b = self.lin.blocks()
        return b.transpose(-1, -2) if self.transposed else b

    def dense_solve(self, b: Tensor) -> Tensor:
        """Solve on ``(S, N)`` rows with the cached batched LU; a leading stack of
        right-hand sides broadcasts over shared blocks."""
        LU, piv = self.lin.lu()
        rhs = b.reshape(-1, *LU.shape[:-1], 1)
        return torch.linalg.lu_solve(LU, piv, rhs, adjoint=self.transposed).reshape(b.shape)


class LinearOperator:
    """Base class; subclasses define ``apply`` and may specialise ``_linearize``."""

    def __init__(self, shape, batch_ndim: int, *, transposed: bool = False,
                 cache: dict | None = None, config: dict | None = None):
        self.shape = torch.Size(shape)
        self.batch_ndim = int(batch_ndim)
        self.transposed = transposed
        self.cache = {} if cache is None else cache
        self.config = {} if config is None else config
        self.rows = math.prod(self.shape[: self.batch_ndim])
        self.row_size = math.prod(self.shape[self.batch_ndim :])

    def apply(self, v: Tensor, *params: Tensor) -> Tensor:
        """``A(params) v`` (never transposed), differentiable in ``v`` and ``params``."""
        raise NotImplementedError

    def _linearize(self, params: Sequence[Tensor], like: Tensor) -> Linearization:
        """Generic: ``A v`` by evaluating ``apply``; ``Aᵀu`` by one stored vjp of the linear
        map ``v ↦ A v``."""
        _, pull = torch.func.vjp(lambda v: self.apply(v, *params), zero_point(like, self.shape))
        return Linearization(self.shape, self.batch_ndim, lambda v: self.apply(v, *params),
                             lambda u: pull(u)[0], like)

    def linearize(self, params: Sequence[Tensor], like: Tensor) -> Linearization:
        """Numeric ``A`` at ``params`` (plain tensors), cached when nothing is transformed."""
        if "lin" in self.cache:
            return self.cache["lin"]
        # leaves as they are (a map may recognise its own tensors); the rest cut from the caller's
        # graph as leaves of their own that still require grad where they did: a recorded graph of
        # f then also gives ∂f/∂θ (:meth:`FixedPointJacobian.held_param_vjp`)
        params = tuple(p if p.grad_fn is None and not is_transformed(p) else
                       p.detach().requires_grad_(p.requires_grad and not is_transformed(p)) for p in params)
        lin = self._linearize(params, like.detach())
        if not any(is_transformed(t) for t in (like, *params)):
            self.cache["lin"] = lin
        return lin

    def release(self) -> None:
        """Drop the cached linearization (and the vjp graph of ``f`` it holds) unless it holds a
        dense factorization, which costs more to rebuild than it holds; the next solve at this
        point linearizes again (one vjp). Shared with ``A.T``."""
        lin = self.cache.get("lin")
        if lin is not None and lin._lu is None and lin._blocks is None and not lin.__dict__.get("factored_rows"):
            del self.cache["lin"]

    def bind(self, params: Sequence[Tensor], like: Tensor) -> BoundOperator:
        return BoundOperator(self.linearize(params, like), self.transposed)

    @property
    def T(self) -> "LinearOperator":
        """The transposed operator; shares this one's cache."""
        twin = self.__class__.__new__(self.__class__)
        twin.__dict__.update(self.__dict__)
        twin.transposed = not self.transposed
        return twin

    def bilinear(self, u: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        """``⟨u, A(params) x⟩`` for this operator (``⟨u, Aᵀx⟩ = ⟨x, A u⟩`` when transposed),
        differentiable in every argument."""
        if self.transposed:
            u, x = x, u
        return (u * self.apply(x, *params)).sum()

    def oriented_apply(self, x: Tensor, *params: Tensor) -> Tensor:
        """``A(params) x`` or ``A(params)ᵀ x``, differentiable in ``params``."""
        if not self.transposed:
            return self.apply(x, *params)
        _, pull = torch.func.vjp(lambda v: self.apply(v, *params), zero_point(x))
        return pull(x)[0]


class FunctionOperator(LinearOperator):
    """``A(p) v = matvec(v, *p)`` for a user function linear in ``v``."""

    def __init__(self, matvec: Callable, shape, batch_ndim, **kw):
        super().__init__(shape, batch_ndim, **kw)
        self.matvec = matvec

    def apply(self, v: Tensor, *params: Tensor) -> Tensor:
        return self.matvec(v, *params)


class FixedPointJacobian(LinearOperator):
    """``A = I − ∂f/∂z`` at ``(z, θ)``: the operator of every derivative solve of a fixed
    point ``z* = f(z*, θ)``. Parameters are ``(z, *θ)``. ``row_params`` (indices into θ of
    the per-row parameters, batch_ndim 1) lets solvers restrict ``A`` to a subset of rows."""

    def __init__(self, f: Callable, shape, batch_ndim, *, row_params: tuple[int, ...] | None = None, **kw):
        super().__init__(shape, batch_ndim, **kw)
        self.f = f
        self.row_params = row_params if batch_ndim == 1 else None

    def apply(self, v: Tensor, z: Tensor, *theta: Tensor) -> Tensor:
        return v - jvp_by_vjp(self.f, (z, *theta), [0], [v])

    def _pullback(self, u: Tensor, z: Tensor, theta) -> Tensor:
        """``Jᵀu`` by one vjp of ``f``, differentiable in ``u``, ``z`` and ``θ``."""
        return vjp(self.f, (z, *theta), [0], u)[0]

    def bilinear(self, u: Tensor, x: Tensor, z: Tensor, *theta: Tensor) -> Tensor:
        """``⟨u, (I − J)x⟩ = ⟨u, x⟩ − ⟨Jᵀu, x⟩``: one vjp of ``f`` instead of the two nested
        ones of ``J x``, so its derivatives in ``(z, θ)`` record one graph level less."""
        if self.transposed:
            u, x = x, u
        return (u * x).sum() - (self._pullback(u, z, theta) * x).sum()

    def oriented_apply(self, x: Tensor, z: Tensor, *theta: Tensor) -> Tensor:
        if not self.transposed:
            return self.apply(x, z, *theta)
        return x - self._pullback(x, z, theta)

    def held_param_vjp(self, u: Tensor, idx: Sequence[int]) -> tuple[Tensor, ...] | None:
        """``(∂f/∂θᵢ)ᵀu`` (``idx`` into θ) from the graph of f that this point's solves hold, or
        ``None`` (see :meth:`_Pullback.param_vjp`)."""
        lin = self.cache.get("lin")
        return None if lin is None else lin.graphs[1].param_vjp(u, idx)

    def _linearize(self, params, like) -> Linearization:
        """One vjp of ``f`` at z* gives ``Jᵀu``; the vjp of that linear map gives ``J v``
        (the double-vjp trick): no iteration re-evaluates ``f``. With the config's
        ``recompute`` (``fixed_point(..., recompute_linearization=True)``) nothing is held:
        every product evaluates ``f`` at z* again and frees its graph (activation
        recomputation, as in gradient checkpointing: Chen et al. 2016, "Training deep nets with
        sublinear memory cost"). With ``single_solve`` (set by a first-order backward, whose
        linearization serves one solve) restricting to rows first frees the full graph."""
        z, *theta = params
        # The linearization is cached on this operator, so nothing in it may refer back to the
        # operator: a cycle operator → cache → closures → operator outlives its step until a
        # full garbage collection, keeping z*, the LU and f's vjp graphs alive (memory then
        # grows with the number of training steps). Its closures capture f and batch_ndim only.
        f, batch_ndim = self.f, self.batch_ndim
        hold = not self.config.get("recompute", False)
        lin = _linearize_fixed_point(f, batch_ndim, z, theta, self.shape, like, hold=hold)
        if self.row_params is not None:
            keep = set(self.row_params)
            full = lin.graphs if self.config.get("single_solve", False) else ()

            def restrict(rows: Tensor) -> Linearization:
                for g in full:  # one solve only: the rows left need no graph of the others
                    g.drop()
                sub = [t.index_select(0, rows) if i in keep else t for i, t in enumerate(theta)]
                zr = z.index_select(0, rows)
                return _linearize_fixed_point(f, batch_ndim, zr, sub, zr.shape, like, hold=hold)

            lin.restrict = restrict
        return lin


def _linearize_fixed_point(f: Callable, batch_ndim: int, z: Tensor, theta, shape, like,
                           hold: bool = True) -> Linearization:
    """``I − ∂f/∂z`` at ``(z, θ)`` (:meth:`FixedPointJacobian._linearize`); refers to no operator.
    ``hold``: f's vjp graph is built at the first product and kept for the next ones (it can be
    dropped, :meth:`_Pullback.drop`, and is then rebuilt on demand); else every product
    recomputes it."""
    jtu = _Pullback(f, z, theta, hold)
    jv = _PullbackOfPullback(jtu, zero_point(z), hold)
    lin = Linearization(shape, batch_ndim, lambda v: v - jv(v), lambda u: u - jtu(u), like, cmv=jv, crmv=jtu)

    def prepare() -> None:  # both products, built outside the vmap that will use them
        jtu.build()
        jv.build()

    lin.prepare = prepare
    lin.graphs = (jv, jtu)
    lin.singular_message = (
        "I − ∂f/∂z is singular at the fixed point z*: the implicit function theorem does not apply "
        "there (z* is not locally unique or not differentiable in the parameters; e.g. f(z) = z)")
    return lin


def _level(t: Tensor) -> int:
    """The ``torch.func`` transform level that wraps ``t`` (-1: a plain tensor)."""
    return torch._C._functorch.maybe_get_level(t)


class _Pullback:
    """``u ↦ Jᵀu = (∂f/∂z)ᵀu`` at ``(z, θ)`` by a vjp of f. ``hold``: the vjp (f's graph at z:
    one evaluation's activations) is built at the first product and kept for the next ones;
    :meth:`drop` frees it (the next product builds it again). Otherwise every product
    evaluates f again and its graph is freed as the backward pass runs through it.

    Plain tensors (no ``torch.func`` transform around) go through ``torch.autograd.grad`` on a
    graph of f recorded once (a quarter of a product's cost less than ``torch.func.vjp``'s
    wrappers, and :class:`_PullbackOfPullback` differentiates that same graph again instead
    of recording f anew); under transforms the pullback is ``torch.func.vjp``'s. A graph first
    built for a vector under a deeper transform than ``(z, θ)`` (``vmap`` of
    :meth:`Linearization.blocks`, the double-vjp of ``J v``) is used once, never kept: it
    belongs to that transform's level."""

    def __init__(self, f: Callable, z: Tensor, theta, hold: bool):
        self.f, self.z, self.theta, self.hold, self.pull = f, z, tuple(theta), hold, None
        self.graph: tuple[Tensor, Tensor] | None = None  # plain autograd: (z leaf, f(z leaf, θ))
        self.level = max(_level(t) for t in (z, *self.theta))
        self.transformed = self.level >= 0

    def _vjp(self):
        f, theta = self.f, self.theta
        return torch.func.vjp(lambda zz: f(zz, *theta), self.z)[1]

    def record(self) -> tuple[Tensor, Tensor]:
        """f's graph at z for plain autograd, ``(z leaf, f(z leaf, θ))``: held when ``hold``. The
        θ of a linearization are leaves (:meth:`LinearOperator.linearize`), so the same graph also
        gives ∂f/∂θ (:meth:`param_vjp`)."""
        if self.graph is not None:
            return self.graph
        with torch.enable_grad():
            zz = self.z.detach().requires_grad_()
            graph = (zz, self.f(zz, *self.theta))
        if self.hold:
            self.graph = graph
        return graph

    def param_vjp(self, u: Tensor, idx: Sequence[int]) -> tuple[Tensor, ...] | None:
        """``(∂f/∂θᵢ)ᵀu`` for ``i`` in ``idx`` from the held graph, freeing it (a first-order
        backward: the adjoint solve's products recorded it, so f is not evaluated again); ``None``
        where no plain graph is held or a result must be differentiable."""
        if self.graph is None or torch.is_grad_enabled() or not plain(u):
            return None
        zz, out = self.graph
        primals = [self.theta[i] for i in idx]
        if not out.requires_grad or not all(t.requires_grad for t in primals):
            return None
        self.graph = None
        grads = torch.autograd.grad(out, primals, u.reshape(out.shape), allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(primals, grads))

    def by_autograd(self, u: Tensor, create_graph: bool = False) -> Tensor:
        """``Jᵀu`` by ``torch.autograd.grad`` through the graph of :meth:`record`."""
        zz, out = self.record()
        if not out.requires_grad:
            return torch.zeros_like(self.z)
        (g,) = torch.autograd.grad(out, zz, u, retain_graph=self.hold or create_graph, create_graph=create_graph,
                                   allow_unused=True)
        return torch.zeros_like(self.z) if g is None else g

    def build(self) -> None:
        if self.hold and self.pull is None:
            self.pull = self._vjp()

    def drop(self) -> None:
        self.pull = self.graph = None

    @property
    def held(self) -> bool:
        """Whether a graph of f is held (for plain autograd or ``torch.func``)."""
        return self.pull is not None or self.graph is not None

    def __call__(self, u: Tensor) -> Tensor:
        if not self.transformed and plain(u):
            return self.by_autograd(u, create_graph=torch.is_grad_enabled())
        if self.pull is not None:
            return self.pull(u)[0]
        if self.hold and _level(u) <= self.level:
            self.build()
            return self.pull(u)[0]
        return self._vjp()(u)[0]  # differentiable in u (the double-vjp trick, transforms)


class _PullbackOfPullback:
    """``v ↦ J v`` as the pullback of the linear map ``u ↦ Jᵀu`` (the double-vjp trick), built on
    first use: adjoint solves (reverse mode) need ``Jᵀu`` only, and building it costs a
    backward pass of f — on small problems a linearization costs as much as a few iterations,
    and compaction re-linearizes. ``hold=False``: rebuilt at every product (nothing kept).
    Plain tensors differentiate ``Jᵀu₀`` of the held graph of f with ``torch.autograd.grad``
    (``u₀`` a zero leaf); under transforms ``torch.func.vjp`` builds the pullback."""

    def __init__(self, jtu: _Pullback, zero: Tensor, hold: bool = True):
        self.jtu, self.zero, self.hold, self.pull = jtu, zero, hold, None
        self.graph: tuple[Tensor, Tensor] | None = None  # plain autograd: (u₀ leaf, Jᵀu₀ with its graph)
        self.level = getattr(jtu, "level", _level(zero))

    def record(self) -> tuple[Tensor, Tensor]:
        if self.graph is not None:
            return self.graph
        with torch.enable_grad():
            # one stored zero, expanded: autograd may save it, so it must not cost a full state
            u0 = self.zero.new_zeros(()).requires_grad_().expand(self.zero.shape)
            graph = (u0, self.jtu.by_autograd(u0, create_graph=True))
        if self.hold:
            self.graph = graph
        return graph

    def build(self) -> None:
        if self.hold and self.pull is None:
            self.pull = torch.func.vjp(self.jtu, self.zero)[1]

    def drop(self) -> None:
        self.pull = self.graph = None

    def __call__(self, v: Tensor) -> Tensor:
        if self.jtu.level < 0 and plain(v) and not torch.is_grad_enabled():
            u0, jtu = self.record()
            if not jtu.requires_grad:
                return torch.zeros_like(v)
            (g,) = torch.autograd.grad(jtu, u0, v, retain_graph=self.hold, allow_unused=True)
            return torch.zeros_like(v) if g is None else g
        if self.pull is None and (not self.hold or _level(v) > self.level):
            return torch.func.vjp(self.jtu, self.zero)[1](v)[0]
        self.build()
        return self.pull(v)[0]


class VmappedOperator(LinearOperator):
    """A stack of ``size`` operators along a new leading row dimension: what a
    ``torch.func.vmap`` over a solve sees. ``in_dims`` marks the parameters that carry the
    stack (moved to dim 0); when none does (many right-hand sides, one operator, as in
    ``jacrev``) the base linearization, blocks and LU are shared, not rebuilt."""

    def __init__(self, base: LinearOperator, in_dims: Sequence[int | None], size: int):
        self.base, self.in_dims, self.size = base, tuple(in_dims), size
        self.shared = all(d is None for d in self.in_dims)
        super().__init__((size, *base.shape), base.batch_ndim + 1, transposed=base.transposed,
                         config=base.config)
        self._apply = torch.func.vmap(base.apply, in_dims=(0, *(None if d is None else 0 for d in in_dims)))

    def apply(self, v: Tensor, *params: Tensor) -> Tensor:
        return self._apply(v, *params)

    def _linearize(self, params, like) -> Linearization:
        if self.shared:
            return StackedLinearization(self.base.linearize(params, like[0]), self.size)
        return super()._linearize(params, like)
