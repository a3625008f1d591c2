"""Models for physics-informed training: the PIDEQ (an implicit tanh layer), its unrolled
twin, an explicit MLP PINN, and a flow-map wrapper conditioned on the initial state.

Every model maps inputs ``x`` of shape ``(B, d_in)`` to outputs ``y`` of shape ``(B, d_out)``;
the coordinate a physics loss differentiates by (time ``t``, space ``x`` …) is a *column* of
``x``, so ``torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0][:, j]`` is
``∂y_i/∂x_j`` per sample (samples never mix: the DEQ's fixed points are per row).

PIDEQ (Pacheco & Camponogara 2022; Pacheco 2023, introduction)::

    z* = tanh(A z* + U x + b),     y = C z* + D x + c.

``mode="implicit"`` (default) solves for z* with :func:`deqdiff.fixed_point` (through
:class:`deqdiff.DEQ`): derivatives of every order — ``∂y/∂t`` and then the gradient of a loss
on it w.r.t. the weights (Pacheco 2023, eq. hessian-t, "Computing gradients through derivatives
of DEQs") — are implicit linear solves with ``I − ∂f/∂z`` at z*. ``mode="unrolled"`` is the
PIDEQ paper's baseline: the same cell iterated by the solver loop *with
autograd recording*, until the same stopping rule ``‖f(z) − z‖ ≤ tol‖f(z)‖`` holds, so every
derivative backpropagates through all iterations (memory grows with iterations).

Stable API (used by other modules and ``benchmarks/bench_pinn.py``):

* ``TanhCell(width, in_features, max_norm=None)``: ``cell(z, x) = tanh(z Aᵀ + x Uᵀ + b)``
  (``max_norm`` = ρ < 1 rescales A to ``‖A‖_F ≤ ρ``: a contraction by construction;
  ``spectral_norm`` = ρ rescales A to ``σ̂(A) ≤ ρ`` with a cached power-iteration estimate σ̂);
  ``cell.jacobian_frobenius(z)``: exact per-sample ``‖∂f/∂z‖_F`` (closed form).
* ``PIDEQ(in_features, out_features, width=80, *, mode="implicit"|"unrolled", solver="anderson",
  tol=1e-4, max_iter=200, unrolled_solver="fixed_point", max_norm=None, spectral_norm=None,
  **solver_options)``;
  ``model(x, **overrides)``, ``model.deq`` (the :class:`deqdiff.DEQ`, ``last_info`` after a
  call), ``model.last_z``, ``model.last_iterations`` (per-row forward iterations, both modes),
  ``model.jacobian_frobenius(x=None)`` (at the last z*), ``model.set_mode(mode)``.
* ``MLP(in_features, out_features, width=20, depth=4)``: explicit tanh PINN (item 4b).
* ``FlowMap(core, state_dim, cond_dim=0, horizon=0.5, state_scale=1, cond_center=0, cond_scale=1,
  rhs=None, order=None)``: ``x = [Δ, y0, c]`` ↦ ``y(Δ) = Taylor_order(Δ; y0) + Δ^{order+1}·core(features)``
  (order 0: ``y0 + Δ·core``; 1: ``y0 + Δ·F(y0) + Δ²·core``; 2: adds ``Δ²/2·(∂F/∂y F)(y0)``);
  the initial condition holds by construction. ``core`` is any model above (its ``in_features = 1 + state_dim + cond_dim``).
* ``count_parameters(model)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..engine import fixed_point
from ..engine.functional import jvp_by_vjp
from ..layers import DEQ
from ..solvers import get_solver

__all__ = ["TanhCell", "PIDEQ", "MLP", "FlowMap", "count_parameters", "MODES"]

MODES = ("implicit", "unrolled")
#: keywords of ``deqdiff.fixed_point`` itself; its other keywords go to the forward solver
_ENGINE_OPTIONS = frozenset(n for n, p in inspect.signature(fixed_point).parameters.items() if p.kind is p.KEYWORD_ONLY)


class TanhCell(nn.Module):
    """``f(z, x) = tanh(z Aᵀ + x Uᵀ + b)`` — the PIDEQ layer (batch dim first).

    ``A`` starts with spectral norm ≈ ``rho`` < 1 so that ``f`` is a contraction at
    initialization (``‖∂f/∂z‖₂ ≤ ‖A‖₂`` since ``|tanh'| ≤ 1``)."""

    def __init__(self, width: int, in_features: int, *, rho: float = 0.5, input_scale: float = 1.0,
                 max_norm: float | None = None, spectral_norm: float | None = None):
        super().__init__()
        for name, v in (("max_norm", max_norm), ("spectral_norm", spectral_norm)):
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v}")
        if max_norm is not None and spectral_norm is not None:
            raise ValueError("give at most one of max_norm (Frobenius bound) and spectral_norm")
        self.max_norm, self.spectral_norm = max_norm, spectral_norm
        if width < 1 or in_features < 1:
            raise ValueError(f"width and in_features must be ≥ 1, got {width}, {in_features}")
        self.width, self.in_features = width, in_features
        A = torch.randn(width, width) / math.sqrt(width)
        A = A * (rho / torch.linalg.matrix_norm(A, ord=2))
        self.A = nn.Parameter(A)
        self.U = nn.Parameter(torch.randn(width, in_features) * (input_scale / math.sqrt(in_features)))
        self.b = nn.Parameter(torch.zeros(width))
        # Cached singular vectors of A for the spectral bound (power iteration, as in
        # torch.nn.utils.spectral_norm); buffers, so checkpoints restore them exactly.
        g = torch.Generator().manual_seed(width)
        self.register_buffer("_u", nn.functional.normalize(torch.randn(width, generator=g), dim=0))
        self.register_buffer("_v", nn.functional.normalize(torch.randn(width, generator=g), dim=0))
        if spectral_norm is not None:
            self.power_iteration(1, tol=1e-6)

    @torch.no_grad()
    def power_iteration(self, steps: int = 1, *, tol: float = 0.0) -> None:
        """Refine the cached top singular pair ``(u, v)`` of ``A``: at least ``steps`` iterations
        and, with ``tol`` > 0, more (up to 200) until σ̂ changes by less than ``tol`` relatively —
        large optimizer steps (L-BFGS) move A far, and a stale σ̂ would break the contraction.
        Called once per training forward pass, never inside a solve, so every solve of a step
        sees one ``A``. Warm-started, so it usually costs a few 2·width² matvecs."""
        A = self.A.detach()
        u, v = self._u, self._v
        sigma = None
        for k in range(200):
            v = nn.functional.normalize(A.T @ u, dim=0, eps=1e-12)
            Av = A @ v
            u = nn.functional.normalize(Av, dim=0, eps=1e-12)
            new = torch.linalg.vector_norm(Av)
            if k + 1 >= steps and (tol <= 0 or (sigma is not None and abs(new - sigma) <= tol * new)):
                break
            sigma = new
        # new tensors, not in-place copies: a graph built since the last call (e.g. the
        # collocation pass before the initial-condition pass of one loss) saved the old ones
        self._u, self._v = u.clone(), v.clone()

    def sigma(self) -> Tensor:
        """Estimate ``σ̂ = uᵀ A v ≤ ‖A‖₂`` (differentiable in A; u, v fixed)."""
        return self._u @ self.A @ self._v

    def weight(self) -> Tensor:
        """The effective ``A``. ``max_norm`` = ρ: ``A·min(1, ρ/‖A‖_F)``, so ``‖A‖₂ ≤ ‖A‖_F ≤ ρ``
        (a contraction for every input and weight, but it caps every singular value at once).
        ``spectral_norm`` = ρ: ``A·min(1, ρ/σ̂)`` with the power-iteration estimate σ̂ of ``‖A‖₂``
        (only the top singular value is bounded; the bound holds up to the estimate's accuracy,
        and a failed solve would be reported by the engine)."""
        if self.max_norm is not None:
            return self.A * torch.clamp(self.max_norm / torch.linalg.vector_norm(self.A), max=1.0)
        if self.spectral_norm is not None:
            return self.A * torch.clamp(self.spectral_norm / self.sigma().abs().clamp_min(1e-12), max=1.0)
        return self.A

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight().T + x @ self.U.T + self.b)

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.width)

    def jacobian_frobenius(self, z: Tensor) -> Tensor:
        """Exact ``‖∂f/∂z‖_F`` per sample at a fixed point ``z = f(z, x)``:
        ``∂f/∂z = diag(1 − z²) A`` so ``‖·‖_F² = Σ_i (1 − z_i²)² ‖A_i,:‖²`` (any width)."""
        A = self.weight()
        return torch.sqrt(((1 - z * z) ** 2 * (A * A).sum(1)).sum(1))


class PIDEQ(nn.Module):
    """``y = C z* + D x + c`` with ``z* = tanh(A z* + U x + b)`` (module docstring).

    ``mode``: ``"implicit"`` (deqdiff, every derivative an implicit solve) or ``"unrolled"``
    (autograd through the iterations of ``unrolled_solver``, default plain Picard iteration,
    stopped by the same rule and ``tol``). Solver options (``solver``, ``tol``, ``max_iter``,
    ``backward_solver``, ``on_fail``, Anderson's ``m`` …) go to :func:`deqdiff.fixed_point`.
    """

    def __init__(self, in_features: int, out_features: int, width: int = 80, *, mode: str = "implicit",
                 solver: str = "anderson", tol: float = 1e-4, max_iter: int = 200,
                 unrolled_solver: str = "fixed_point", skip: bool = True, rho: float = 0.5,
                 input_scale: float = 1.0, max_norm: float | None = None, spectral_norm: float | None = None,
                 on_fail: str = "warn", **solver_options):
        super().__init__()
        self.in_features, self.out_features, self.width = in_features, out_features, width
        cell = TanhCell(width, in_features, rho=rho, input_scale=input_scale, max_norm=max_norm,
                        spectral_norm=spectral_norm)
        self.deq = DEQ(cell, solver=solver, tol=tol,
                       max_iter=max_iter, on_fail=on_fail, **solver_options)
        self.C = nn.Linear(width, out_features)
        nn.init.normal_(self.C.weight, std=1.0 / math.sqrt(width))
        nn.init.zeros_(self.C.bias)
        self.D = nn.Linear(in_features, out_features, bias=False) if skip else None
        if self.D is not None:
            nn.init.zeros_(self.D.weight)
        self.unrolled_solver = unrolled_solver
        self.set_mode(mode)
        self.last_z: Tensor | None = None
        self.last_iterations: Tensor | None = None

    @property
    def cell(self) -> TanhCell:
        return self.deq.cell

    def set_mode(self, mode: str) -> "PIDEQ":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        return self

    def equilibrium(self, x: Tensor, **overrides) -> Tensor:
        """z* (per row), implicitly differentiable or unrolled according to ``mode``."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"PIDEQ expects inputs of shape (B, {self.in_features}), got {tuple(x.shape)}")
        if self.mode == "implicit":
            z = self.deq(x, **overrides)
            self.last_iterations = self.deq.last_info.forward.iterations
        else:
            z = self._unrolled(x, **overrides)
        self.last_z = z
        return z

    def _unrolled(self, x: Tensor, **overrides) -> Tensor:
        opts = {**self.deq.solver_options, **overrides}
        solver = get_solver(opts.pop("unrolled_solver", self.unrolled_solver), "forward")
        tol, atol, max_iter = opts.pop("tol", 1e-6), opts.pop("atol", 0.0), opts.pop("max_iter", 200)
        # the solver's own options (Anderson's m, restart …) as the implicit mode passes them
        own = {k: v for k, v in opts.items() if k not in _ENGINE_OPTIONS}
        cell = self.cell
        with torch.enable_grad():  # the solver loop records the graph: this *is* the baseline
            z, info = solver(lambda z: cell(z, x), cell.init_state(x), tol=tol, atol=atol, max_iter=max_iter, **own)
            z = cell(z, x)  # output f(z_K): dependence on the weights even when z_0 already met the rule
        self.last_iterations = info.iterations
        if opts.get("on_fail", "warn") != "ignore" and not info.all_converged:
            from ..solvers.base import report_failure
            report_failure(info, opts.get("on_fail", "warn"), "unrolled fixed-point solve")
        return z

    def forward(self, x: Tensor, **overrides) -> Tensor:
        if self.training and self.cell.spectral_norm is not None and torch.is_grad_enabled():
            self.cell.power_iteration(1, tol=1e-4)
        z = self.equilibrium(x, **overrides)
        y = self.C(z)
        return y + self.D(x) if self.D is not None else y

    def jacobian_frobenius(self, z: Tensor | None = None) -> Tensor:
        """Exact per-sample ``‖∂f/∂z‖_F`` at ``z`` (default: the last z*, with its graph)."""
        z = self.last_z if z is None else z
        if z is None:
            raise RuntimeError("call the model first (jacobian_frobenius is evaluated at the last z*)")
        return self.cell.jacobian_frobenius(z)


class MLP(nn.Module):
    """Explicit PINN: ``depth`` hidden tanh layers of ``width`` units."""

    def __init__(self, in_features: int, out_features: int, width: int = 20, depth: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {depth}")
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Tanh()]
            d = width
        layers.append(nn.Linear(d, out_features))
        self.net = nn.Sequential(*layers)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor, **_) -> Tensor:
        return self.net(x)


def _as_buffer(v, n: int) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.get_default_dtype()).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"expected a scalar or {n} values, got {t.numel()}")
    return t


class FlowMap(nn.Module):
    """Conditioned short-horizon model ``y(Δ; y0, c)`` with inputs ``x = [Δ, y0, c]``
    ``(B, 1 + state_dim + cond_dim)`` and normalized core features ``φ = [2Δ/h − 1, y0/s, (c − c̄)/σ]``.

    With the ODE's right-hand side ``rhs(t, y[, c])`` (autonomous: ``t`` is passed as 0) the exact
    Taylor polynomial of the flow up to ``order`` is a fixed skip and the core learns only the
    remainder:

    * ``order = 0``: ``y = y0 + Δ·core(φ)`` (no ``rhs`` needed);
    * ``order = 1``: ``y = y0 + Δ·F(y0) + Δ²·core(φ)``;
    * ``order = 2``: ``y = y0 + Δ·F(y0) + Δ²/2·(∂F/∂y F)(y0) + Δ³·core(φ)``,

    since ``ẏ = F(y)`` and ``ÿ = (∂F/∂y) F`` along the flow. ``y`` then agrees with the true flow
    to order ``Δ^order`` whatever the weights (``y(0) = y0`` exactly; no initial-condition loss is
    needed) and the physics residual trains the ``O(Δ^{order+1})`` remainder. ``(∂F/∂y)F`` is one
    forward-mode product (:func:`torch.func.jvp`), differentiable by autograd. Applied repeatedly
    it simulates long trajectories (:func:`deqdiff.physics.rollout.rollout`).

    ``taylor_features=True`` also feeds the core ``asinh(y^{(k)}(0)/s)`` (``k = 1..order``), the
    same derivatives the skip uses, so the network sees the local dynamics directly."""

    def __init__(self, core: nn.Module, state_dim: int, cond_dim: int = 0, *, horizon: float = 0.5,
                 state_scale: float | Sequence[float] = 1.0, cond_center: float | Sequence[float] = 0.0,
                 cond_scale: float | Sequence[float] = 1.0, rhs=None, order: int | None = None,
                 taylor_features: bool = False):
        super().__init__()
        self.taylor_features = bool(taylor_features)
        order = (1 if rhs is not None else 0) if order is None else int(order)
        if order not in (0, 1, 2):
            raise ValueError(f"order must be 0, 1 or 2, got {order}")
        if order > 0 and rhs is None:
            raise ValueError(f"a Taylor skip of order {order} needs the right-hand side rhs")
        self.rhs, self.order = rhs, order
        if not horizon > 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        n_feat = 1 + state_dim + cond_dim + (order * state_dim if self.taylor_features else 0)
        if getattr(core, "in_features", n_feat) != n_feat:
            raise ValueError(f"core must take {n_feat} inputs (1 + state_dim + cond_dim"
                             f"{' + order·state_dim Taylor features' if self.taylor_features else ''})")
        self.core_features = n_feat
        self.core, self.state_dim, self.cond_dim, self.horizon = core, state_dim, cond_dim, float(horizon)
        self.in_features, self.out_features = 1 + state_dim + cond_dim, state_dim
        self.register_buffer("state_scale", _as_buffer(state_scale, state_dim))
        self.register_buffer("cond_center", _as_buffer(cond_center, cond_dim))
        self.register_buffer("cond_scale", _as_buffer(cond_scale, cond_dim))

    @property
    def deq(self):
        return getattr(self.core, "deq", None)

    def features(self, x: Tensor) -> Tensor:
        n = self.state_dim
        dt, y0, c = x[:, :1], x[:, 1:1 + n], x[:, 1 + n:]
        parts = [2 * dt / self.horizon - 1, y0 / self.state_scale]
        if self.cond_dim:
            parts.append((c - self.cond_center) / self.cond_scale)
        if self.taylor_features:  # the flow's derivatives at Δ = 0, compressed by asinh
            parts += [torch.asinh(term / self.state_scale) for term in self.taylor_terms(x)]
        return torch.cat(parts, 1)

    def taylor_terms(self, x: Tensor) -> list[Tensor]:
        """``[F(y0), (∂F/∂y F)(y0)]`` up to ``order`` (the flow's Δ-derivatives at Δ = 0 divided
        by nothing: the caller applies ``Δ^k/k!``)."""
        if self.order == 0:
            return []
        y0, c = x[:, 1:1 + self.state_dim], x[:, 1 + self.state_dim:]
        t0 = torch.zeros_like(x[:, 0])
        F = (lambda y: self.rhs(t0, y, c)) if self.cond_dim else (lambda y: self.rhs(t0, y))
        if self.order == 1:
            return [F(y0)]
        f0 = F(y0)
        # (∂F/∂y)·F by two reverse passes, not torch.func.jvp: it must also run inside the
        # forward-mode pass that gives ∂y/∂Δ (PyTorch has no nested forward levels)
        return [f0, jvp_by_vjp(F, (y0,), [0], (f0,))]

    def skip(self, x: Tensor) -> Tensor:
        """The Taylor polynomial ``Σ_k Δ^k/k! · y^{(k)}(0)`` (``k ≤ order``) alone."""
        dt, y = x[:, :1], x[:, 1:1 + self.state_dim]
        for k, term in enumerate(self.taylor_terms(x), start=1):
            y = y + dt ** k / math.factorial(k) * term
        return y

    def forward(self, x: Tensor, **overrides) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FlowMap expects inputs (B, {self.in_features}) = [Δ, y0, c], got {tuple(x.shape)}")
        g = self.core(self.features(x), **overrides)
        return self.skip(x) + x[:, :1] ** (self.order + 1) * g

    def jacobian_frobenius(self, z: Tensor | None = None) -> Tensor:
        return self.core.jacobian_frobenius(z)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
