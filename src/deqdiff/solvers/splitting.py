"""Operator-splitting solvers for monotone DEQs (Winston & Kolter 2020; Nguyen 2022 §2.3.2, §3.2.2).

A monotone DEQ's equilibrium ``z* = σ(W z* + c)`` (``c = Ux + b``) with ``I − W ⪰ mI`` and
``σ = prox¹_f`` for a convex closed proper ``f`` is the zero of the operator sum
``0 ∈ F(z) + ∂f(z)``, ``F(z) = (I − W) z − c`` (Nguyen 2022, Problem 1). ``F`` is m-strongly
monotone and L-Lipschitz, ``L = ‖I − W‖₂``. Two splittings find it:

* forward–backward (FB):  ``z ← prox^α_f(z − α((I − W) z − c))``; converges linearly for
  ``α ∈ (0, 2m/L²)`` with factor ``√(1 − 2αm + α²L²)`` (Proposition 3);
* Peaceman–Rachford (PR), any ``α > 0``::

      u½ = 2z − u;  z½ = (I + α(I − W))⁻¹(u½ + αc);  u = 2z½ − u½;  z = prox^α_f(u).

Derivative (adjoint) systems have the same structure. With ``D = diag(σ'(W z* + c))``
(entries in [0, 1]) the engine's operator is ``I − J = I − DW``:

* reverse mode ``(I − WᵀD) w = b``: with ``u = D w``, ``u = D(Wᵀu + b)`` and ``w = b + Wᵀu``;
* forward mode ``(I − DW) t = b``: with ``u = t − b``, ``u = D(W u + W b)`` and ``t = u + b``.

Both are monotone DEQs ``u = prox¹_{f_D}(M u + c)`` with ``M ∈ {W, Wᵀ}`` (``I − Wᵀ ⪰ mI`` too,
same L) and the quadratic ``f_D(u) = Σᵢ ½(1/dᵢ − 1)uᵢ²`` (``dᵢ = 0``: the indicator of
``uᵢ = 0``), whose prox is ``prox^α_{f_D}(v)ᵢ = dᵢvᵢ / (dᵢ + α(1 − dᵢ))``. This is Winston &
Kolter's backward pass, run by the same FB/PR loop as the forward solve.

Activations admitted (scalar σ is a prox of a CCP function iff it is nondecreasing and
nonexpansive): ReLU and leaky ReLU (closed-form prox), tanh and softplus (prox by a
safeguarded scalar Newton solve). Sigmoid-type functions with σ' > 1 are not admitted.

Conventions are those of ``solvers/base.py``: ``(S, N)`` rows, the stopping rule
``‖g(z) − z‖ ≤ atol + tol‖g(z)‖`` (forward) / ``‖b − Ax‖ ≤ atol + tol‖b‖`` (linear),
``Tracker``/``SolveInfo``; failures are reported by the engine through ``report_failure``.
The solvers are callables for ``fixed_point(..., solver=forward_backward, splitting=...)``
(and ``backward_solver=..._linear`` with ``backward_options={"splitting": ...}``); the
``splitting`` object (:class:`MonotoneSplit`) holds the numeric structure (W, c, σ).

Under ``torch.func.vmap`` the engine solves ``size`` copies of the problem stacked as rows
``(size·S, N)``; :meth:`MonotoneSplit.vmap_rows` (called by the engine's vmap rule) gives the
structure for that layout: c and D become rows, and W (or the convolution kernels), when the
vmapped values differ per copy (a vmap over parameter sets), one block per copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SolveInfo, Tracker, row_norm

_functorch = torch._C._functorch

__all__ = [
    "ProxActivation",
    "get_activation",
    "MonotoneSplit",
    "DenseMonotone",
    "forward_backward",
    "peaceman_rachford",
    "forward_backward_linear",
    "peaceman_rachford_linear",
    "SPLITTING_SOLVERS",
    "SPLITTING_LINEAR_SOLVERS",
    "fb_contraction_factor",
]


# ----------------------------------------------------------------------------- activations


class ProxActivation:
    """A scalar activation σ = prox¹_f of a CCP ``f``, with its α-prox and derivative.

    ``zero_at_zero``: σ(0) = 0 (0 minimizes f), which the state bound ‖z*‖ ≤ ‖c‖/m needs."""

    name = "abstract"
    zero_at_zero = True

    def __call__(self, x: Tensor) -> Tensor:  # differentiable σ (used by the cells)
        raise NotImplementedError

    def prox(self, x: Tensor, alpha: float) -> Tensor:
        """``prox^α_f(x) = argmin_z ½‖x − z‖² + α f(z)``."""
        raise NotImplementedError

    def derivative(self, pre: Tensor) -> Tensor:
        """σ'(pre) ∈ [0, 1], matching autograd's convention at kinks."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLUProx(ProxActivation):
    """σ = ReLU, f = indicator of the nonnegative orthant: prox^α_f = ReLU for every α."""

    name = "relu"

    def __call__(self, x):
        return F.relu(x)

    def prox(self, x, alpha):
        return x.clamp_min(0)

    def derivative(self, pre):
        return (pre > 0).to(pre.dtype)


class LeakyReLUProx(ProxActivation):
    """σ(x) = x (x ≥ 0), a·x (x < 0), a ∈ (0, 1]; f(z) = ½(1/a − 1)z² for z < 0, so
    prox^α_f(x) = x/(1 + α(1/a − 1)) for x < 0."""

    name = "leaky_relu"

    def __init__(self, slope: float = 0.1):
        if not 0.0 < slope <= 1.0:
            raise ValueError(f"leaky_relu slope must be in (0, 1] to be a prox, got {slope}")
        self.slope = float(slope)

    def __call__(self, x):
        return F.leaky_relu(x, self.slope)

    def prox(self, x, alpha):
        return torch.where(x >= 0, x, x / (1.0 + alpha * (1.0 / self.slope - 1.0)))

    def derivative(self, pre):
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, self.slope))

    def __repr__(self):
        return f"LeakyReLUProx(slope={self.slope})"


class SmoothProx(ProxActivation):
    """A smooth nondecreasing nonexpansive σ (tanh, softplus). ``prox^α_f(x) = σ(y)`` where
    y solves ``(1 − α)σ(y) + αy = x`` (from ``x − z ∈ α(σ⁻¹(z) − z)``); the left side is
    strictly increasing with slope in [min(1, α), max(1, α)], solved by Newton with a
    bisection safeguard inside the bracket that the slope bounds give."""

    def __init__(self, name: str):
        fns = {
            "tanh": (torch.tanh, lambda y: 1 - torch.tanh(y) ** 2, True),
            "softplus": (F.softplus, torch.sigmoid, False),
        }
        if name not in fns:
            raise ValueError(f"unknown smooth prox activation {name!r}; choose from {sorted(fns)}")
        self.name = name
        self.fn, self.dfn, self.zero_at_zero = fns[name]

    def __call__(self, x):
        return self.fn(x)

    def derivative(self, pre):
        return self.dfn(pre)

    def prox(self, x, alpha, iters: int = 60):
        if alpha == 1.0:
            return self.fn(x)
        lo_slope = min(1.0, alpha)  # h' = (1 − α) fn' + α ≥ min(1, α): the root lies within |h| / lo_slope
        y = x.clone()
        h = (1 - alpha) * self.fn(y) + alpha * y - x
        lo, hi = y - h.abs() / lo_slope, y + h.abs() / lo_slope
        tiny = 4 * torch.finfo(x.dtype).eps * (1 + x.abs())
        for _ in range(iters):
            h = (1 - alpha) * self.fn(y) + alpha * y - x
            if bool((h.abs() <= tiny).all()):
                break
            lo = torch.where(h < 0, y, lo)
            hi = torch.where(h > 0, y, hi)
            step = y - h / ((1 - alpha) * self.dfn(y) + alpha)
            y = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        return self.fn(y)

    def __repr__(self):
        return f"SmoothProx({self.name!r})"


def get_activation(name: str | ProxActivation, **kwargs) -> ProxActivation:
    """``"relu"``, ``"leaky_relu"`` (``slope``), ``"tanh"``, ``"softplus"`` or an instance."""
    if isinstance(name, ProxActivation):
        return name
    if name == "relu":
        return ReLUProx()
    if name == "leaky_relu":
        return LeakyReLUProx(**kwargs)
    if name in ("tanh", "softplus"):
        return SmoothProx(name)
    raise ValueError(
        f"activation {name!r} is not a supported proximal operator; choose relu, leaky_relu, tanh or softplus"
    )


class DiagonalProx(ProxActivation):
    """prox of ``f_D(u) = Σ ½(1/dᵢ − 1)uᵢ²``: ``prox^α(v) = d v/(d + α(1 − d))`` (0 where d = 0).
    The 'activation' of the derivative systems (module docstring)."""

    name = "diagonal"

    def __init__(self, d: Tensor):
        self.d = d

    def __call__(self, x):
        return self.d * x

    def prox(self, x, alpha):
        d = self.d
        return torch.where(d > 0, d * x / (d + alpha * (1 - d)).clamp_min(torch.finfo(d.dtype).tiny), 0.0)

    def derivative(self, pre):
        return self.d


# ----------------------------------------------------------------------------- structure


def _above_current(t: Tensor) -> bool:
    """Whether ``t``'s outer functorch wrapper belongs to a level that is not active here (a
    vmap level lowered by a rule, or a dead wrapper of a finished grad level)."""
    if not _functorch.is_functorch_wrapped_tensor(t):
        return False
    return _functorch.is_dead_tensor_wrapper(t) or _functorch.maybe_get_level(t) > (_functorch.maybe_current_level() or 0)


def _lower(t: Tensor, size: int) -> tuple[Tensor, bool]:
    """``t`` as the engine's vmap rule sees it: the functorch wrappers of levels above the
    current one are peeled (the vmap level being lowered, and dead ones of grad levels already
    processed); the vmapped dim, if ``t`` has one, moves to the front. Returns the tensor and
    whether it was batched."""
    batched = False
    while _above_current(t):
        if _functorch.is_batchedtensor(t):
            bdim = _functorch.maybe_get_bdim(t)
            t = _functorch.get_unwrapped(t).movedim(bdim, 0)
            if batched or t.shape[0] != size:  # the rule lowers exactly one vmap level of this size
                raise RuntimeError(f"splitting structure: unexpected vmap batching {tuple(t.shape)} (size {size})")
            batched = True
        else:
            t = _functorch.get_unwrapped(t)
    return t, batched


def _vmapped_outside(t: Tensor | None) -> bool:
    """Whether ``t`` is batched by a vmap level that is not active here: the tensor was made
    inside a vmapped function and is used by a solve that vmap lowered past it."""
    while t is not None and _above_current(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def _lower_rows(t: Tensor, size: int) -> Tensor:
    """Rows ``(S, N)`` of ``t`` stacked for the vmapped problem: ``(size·S, N)``, copy-major
    (the order of the engine's vmapped rows)."""
    t, batched = _lower(t, size)
    if not batched:
        t = t.expand(size, *t.shape)
    return t.reshape(-1, t.shape[-1])


def _lower_blocks(t: Tensor, size: int, ndim: int) -> Tensor:
    """A per-problem tensor (``ndim`` dims, e.g. W) for the vmapped problem: unchanged when no
    copy changes it, else one block per copy, ``(blocks, *shape)`` (copy-major, like the rows)."""
    t, batched = _lower(t, size)
    if not batched and t.ndim == ndim:
        return t  # shared by every copy
    if not batched:
        t = t.expand(size, *t.shape)
    return t.reshape(-1, *t.shape[-ndim:])


def _blocked(v: Tensor, blocks: int) -> Tensor:
    """Rows ``(R, …)`` as ``(blocks, R/blocks, …)``: the rows of each block's problem."""
    return v.reshape(blocks, v.shape[0] // blocks, *v.shape[1:])



class MonotoneSplit:
    """Numeric structure of ``z = σ(W z + c)`` on ``(S, N)`` rows with ``I − W ⪰ mI``.

    Subclasses implement ``matvec(v, transposed)`` (``W v`` or ``Wᵀ v`` row-wise),
    ``resolvent(v, alpha, transposed)`` (``(I + α(I − W))⁻¹ v``, or with Wᵀ) and
    ``op_norm()`` (``L = ‖I − W‖₂``). All tensors are detached. ``set_point(z*)`` fixes
    ``D = σ'(W z* + c)`` for the derivative solves (the forward splitting solvers call it).
    """

    def __init__(self, activation: ProxActivation, c: Tensor, m: float):
        if not m > 0:
            raise ValueError(f"monotonicity parameter m must be > 0, got {m}")
        self.activation = activation
        self.c = c.detach()
        self.m = float(m)
        self.d: Tensor | None = None
        self._L: float | None = None

    def matvec(self, v: Tensor, transposed: bool = False) -> Tensor:
        raise NotImplementedError

    def resolvent(self, v: Tensor, alpha: float, transposed: bool = False) -> Tensor:
        raise NotImplementedError

    def _op_norm(self) -> float:
        raise NotImplementedError

    def op_norm(self) -> float:
        """``L = ‖I − W‖₂`` (computed once)."""
        if self._L is None:
            self._L = float(self._op_norm())
        return self._L

    def alpha_bound(self) -> float:
        """FB converges for α ∈ (0, 2m/L²)."""
        return 2 * self.m / self.op_norm() ** 2

    def set_point(self, z: Tensor) -> None:
        z = z.detach().reshape(self.c.shape)
        self.d = self.activation.derivative(self.matvec(z) + self.c)

    def residual_map(self, z: Tensor) -> Tensor:
        """``σ(W z + c)`` (the DEQ map this structure describes)."""
        return self.activation(self.matvec(z) + self.c)

    def vmap_rows(self, size: int) -> "MonotoneSplit":
        """The structure of the ``size`` stacked copies that ``torch.func.vmap`` over a solve
        produces (module docstring); called by the engine's vmap rule, inside it."""
        new = copy.copy(self)
        new.c = _lower_rows(self.c, size)
        new.d = None if self.d is None else _lower_rows(self.d, size)
        new._L = None
        new._lower_operator(size)
        return new

    def _lower_operator(self, size: int) -> None:
        """Lower the operator's tensors (W, kernels …) with :func:`_lower_blocks` (in place on a copy)."""
        raise NotImplementedError


class DenseMonotone(MonotoneSplit):
    """Fully connected W (N×N, or ``(G, N, N)`` blocks: block g acts on the g-th of G equal
    slices of the rows, see :meth:`MonotoneSplit.vmap_rows`); the resolvent is a dense inverse
    cached per α."""

    def __init__(self, W: Tensor, c: Tensor, activation: ProxActivation, m: float):
        super().__init__(activation, c, m)
        self.W = W.detach()
        if self.W.shape != (c.shape[-1], c.shape[-1]):
            raise ValueError(f"W has shape {tuple(W.shape)} but rows have {c.shape[-1]} unknowns")
        self._inv: dict[tuple[float, bool], Tensor] = {}

    @staticmethod
    def _rows_times(v: Tensor, M: Tensor, transposed: bool) -> Tensor:
        """Rows of ``M v`` (``Mᵀ v`` if ``transposed``), M shared or one block per row slice."""
        if M.ndim == 2:
            return v @ M if transposed else v @ M.T
        out = _blocked(v, M.shape[0]) @ (M if transposed else M.mT)
        return out.reshape(v.shape)

    def matvec(self, v, transposed=False):
        return self._rows_times(v, self.W, transposed)

    def resolvent(self, v, alpha, transposed=False):
        key = (float(alpha), False)
        if key not in self._inv:
            n = self.W.shape[-1]
            eye = torch.eye(n, dtype=self.W.dtype, device=self.W.device)
            self._inv[key] = torch.linalg.inv(eye + alpha * (eye - self.W))
        return self._rows_times(v, self._inv[key], transposed)

    def _op_norm(self):
        eye = torch.eye(self.W.shape[-1], dtype=self.W.dtype, device=self.W.device)
        return torch.linalg.matrix_norm(eye - self.W, 2).max()  # blocks: the largest L bounds them all

    def _lower_operator(self, size):
        self.W = _lower_blocks(self.W, size, 2)
        self._inv = {}


def fb_contraction_factor(alpha: float, m: float, L: float) -> float:
    """Proposition 3 (Nguyen 2022 §3.2.2): ``L[T_α] ≤ √(1 − 2αm + α²L²)``; < 1 iff α ∈ (0, 2m/L²)."""
    return math.sqrt(max(0.0, 1.0 - 2.0 * alpha * m + alpha**2 * L**2))


# ----------------------------------------------------------------------------- problems


class _Problem:
    """``u = prox¹(M u + c)`` plus how to measure an iterate (the loops' only interface).

    ``measure(u, pre)`` with ``pre = M u + c`` returns ``(reported iterate, residual, scale)``."""

    def __init__(self, split: MonotoneSplit, transposed: bool, c: Tensor, prox: ProxActivation, measure: Callable):
        self.split, self.transposed, self.c, self.prox, self.measure = split, transposed, c, prox, measure

    def pre(self, u: Tensor) -> Tensor:
        return self.split.matvec(u, self.transposed) + self.c

    def resolvent(self, v: Tensor, alpha: float) -> Tensor:
        return self.split.resolvent(v, alpha, self.transposed)


def _check_rows(split: MonotoneSplit, rows: Tensor, what: str) -> None:
    if rows.shape != split.c.shape:
        raise ValueError(
            f"{what}: the solver works on rows of shape {tuple(rows.shape)} but the splitting structure "
            f"describes {tuple(split.c.shape)} (batch × unknowns); build it from the same batch"
        )


def _fb_alpha(split: MonotoneSplit, alpha: float | None, check: str) -> float:
    """Default α = m/L² (minimizes Proposition 3's factor); outside (0, 2m/L²) raise or warn."""
    bound = split.alpha_bound()
    if alpha is None:
        return 0.5 * bound
    if not alpha > 0:
        raise ValueError(f"forward-backward step alpha must be > 0, got {alpha}")
    if alpha >= bound:
        msg = (
            f"forward-backward step alpha={alpha:g} is outside the admissible range (0, 2m/L²) = "
            f"(0, {bound:.4g}) (m={split.m:g}, L=‖I − W‖₂={split.op_norm():.4g}): convergence is not "
            f"guaranteed (Proposition 3 factor {fb_contraction_factor(alpha, split.m, split.op_norm()):.4g} ≥ 1)"
        )
        if check == "raise":
            raise ValueError(msg + "; pass check_alpha='warn' to run anyway")
        if check == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
        elif check != "ignore":
            raise ValueError(f"check_alpha must be 'raise', 'warn' or 'ignore', got {check!r}")
    return float(alpha)


# ----------------------------------------------------------------------------- loops (one per algorithm)


def _fb_loop(prob: _Problem, u0: Tensor, alpha: float, track: Tracker, max_iter: int) -> None:
    """Forward–backward: ``u ← prox^α(u − α((I − M)u − c)) = prox^α(u + α(pre − u))``."""
    u = u0
    for k in range(max_iter + 1):
        pre = prob.pre(u)
        x, res, scale = prob.measure(u, pre)
        running = track.update(k, x, res, scale)
        if track.finished or k == max_iter or not bool(torch.isfinite(res[running]).any()):
            break
        u = torch.where(running[:, None], prob.prox.prox(u + alpha * (pre - u), alpha), u)


def _pr_loop(prob: _Problem, u0: Tensor, alpha: float, track: Tracker, max_iter: int) -> None:
    """Peaceman–Rachford (Winston & Kolter 2020, Alg. 2) on the state (z, u)."""
    z, u = u0, u0
    ac = alpha * prob.c
    for k in range(max_iter + 1):
        x, res, scale = prob.measure(z, prob.pre(z))
        running = track.update(k, x, res, scale)
        if track.finished or k == max_iter or not bool(torch.isfinite(res[running]).any()):
            break
        u_half = 2 * z - u
        z_half = prob.resolvent(u_half + ac, alpha)
        u_new = 2 * z_half - u_half
        z = torch.where(running[:, None], prob.prox.prox(u_new, alpha), z)
        u = torch.where(running[:, None], u_new, u)


# ----------------------------------------------------------------------------- forward solvers


def _verify_forward(g, track: Tracker, split: MonotoneSplit) -> None:
    """One evaluation of the engine's map at the result: rows the structure declared converged
    must satisfy the rule under ``g`` too (else the structure does not describe ``f``)."""
    z = track.result
    gz = g(z)
    _check_structure(track, row_norm(gz - z), row_norm(gz), lambda i, r: (
        f"splitting structure does not describe the fixed-point map: row {i} converged for the structure "
        f"but ‖f(z) − z‖ = {r:.3e} under f; build the structure from the same weights and input"))
    split.set_point(z)


def _check_structure(track: Tracker, res: Tensor, scale: Tensor, message) -> None:
    """Rows the structure's own loop declared converged must meet the rule (with slack for
    roundoff) under the engine's map/operator too; ``message(row, residual)`` names the mismatch."""
    slack = 2 * (track.atol + track.tol * scale) + 1e3 * torch.finfo(res.dtype).eps * scale
    bad = track.done & (res > slack)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(message(i, float(res[i])))


def _forward_problem(split: MonotoneSplit, scale: Tensor | None) -> _Problem:
    act = split.activation

    def measure(u, pre):
        gz = act(pre)
        return u, row_norm(gz - u), row_norm(gz) if scale is None else scale

    return _Problem(split, False, split.c, act, measure)


def forward_backward(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    splitting: MonotoneSplit,
    alpha: float | None = None,
    check_alpha: str = "raise",
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
) -> tuple[Tensor, SolveInfo]:
    """Forward–backward splitting for ``z = σ(W z + c)`` (module docstring).

    ``alpha`` defaults to m/L² (fastest bound of Proposition 3); outside (0, 2m/L²) it raises
    (``check_alpha="raise"``), warns (``"warn"``) or runs silently (``"ignore"``); a
    diverging run stops when every running row's residual is non-finite and is reported
    (with its residual) by the engine's ``on_fail``. ``g`` (the engine's map) is evaluated
    once at the end to verify the result."""
    _check_rows(splitting, z0, "forward_backward")
    a = _fb_alpha(splitting, alpha, check_alpha)
    track = Tracker(z0, tol, atol, store_trajectory)
    _fb_loop(_forward_problem(splitting, scale), z0, a, track, max_iter)
    _verify_forward(g, track, splitting)
    return track.result, track.info("forward_backward", "forward", alpha=a, L=splitting.op_norm(), m=splitting.m)


def peaceman_rachford(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    splitting: MonotoneSplit,
    alpha: float | None = 1.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int = 100,
    scale: Tensor | None = None,
    store_trajectory: bool = False,
) -> tuple[Tensor, SolveInfo]:
    """Peaceman–Rachford splitting for ``z = σ(W z + c)``; converges for every α > 0
    (default 1, Winston & Kolter's choice)."""
    _check_rows(splitting, z0, "peaceman_rachford")
    a = 1.0 if alpha is None else float(alpha)
    if not a > 0:
        raise ValueError(f"Peaceman-Rachford alpha must be > 0, got {alpha}")
    track = Tracker(z0, tol, atol, store_trajectory)
    _pr_loop(_forward_problem(splitting, scale), z0, a, track, max_iter)
    _verify_forward(g, track, splitting)
    return track.result, track.info("peaceman_rachford", "forward", alpha=a, m=splitting.m)


# ----------------------------------------------------------------------------- linear (derivative) solvers


def _linear_problem(split: MonotoneSplit, op, b: Tensor) -> tuple[_Problem, Tensor, Callable]:
    """The derivative system ``A x = b`` (A = I − DW, or its transpose) as a monotone DEQ in u;
    returns the problem, ``x ↦ u0`` and the scale ‖b‖."""
    if _vmapped_outside(split.c) or _vmapped_outside(split.d):
        raise NotImplementedError(
            "splitting derivative solves (backward_solver 'pr'/'fb') do not run in derivatives taken under "
            "torch.func.vmap (the structure holds vmapped values the solve cannot see); use an engine "
            "backward_solver such as 'auto' (the models' default)")
    if split.d is None:
        raise ValueError("splitting structure has no point: call splitting.set_point(z*) before derivative solves")
    S = split.c.shape[0]
    if b.shape[1] != split.c.shape[1] or b.shape[0] % S:
        raise ValueError(f"derivative rows {tuple(b.shape)} do not match the structure {tuple(split.c.shape)}")
    d = split.d.repeat(b.shape[0] // S, 1)  # stacked right-hand sides (vmap over one operator)
    prox = DiagonalProx(d)
    bnorm = row_norm(b)
    transposed = bool(op.transposed)

    if transposed:  # (I − WᵀD) w = b:  u = D(Wᵀu + b), w = b + Wᵀu = pre
        def measure(u, pre):
            return pre, row_norm(split.matvec(d * pre - u, True)), bnorm

        c, to_u = b, (lambda x: d * x)
    else:  # (I − DW) t = b:  u = D(W u + W b), t = u + b, residual D W t − u = d·pre − u
        def measure(u, pre):
            return u + b, row_norm(d * pre - u), bnorm

        c, to_u = split.matvec(b), (lambda x: x - b)

    class _Rows(MonotoneSplit):  # the structure, tiled over stacked right-hand sides
        def __init__(self):
            self.m, self.activation, self.c = split.m, prox, c

        def matvec(self, v, transposed=False):
            return _tiled(split.matvec, v, S, transposed)

        def resolvent(self, v, alpha, transposed=False):
            return _tiled(lambda w, t: split.resolvent(w, alpha, t), v, S, transposed)

    return _Problem(_Rows(), transposed, c, prox, measure), to_u


def _tiled(fn, v: Tensor, S: int, transposed: bool) -> Tensor:
    """Apply a per-batch map to ``k`` stacked copies of the ``S`` rows."""
    if v.shape[0] == S:
        return fn(v, transposed)
    return torch.cat([fn(chunk, transposed) for chunk in v.split(S)], 0)


def _linear_solve(loop, name: str, op, b: Tensor, x0, split, alpha, tol, atol, max_iter) -> tuple[Tensor, SolveInfo]:
    prob, to_u = _linear_problem(split, op, b)
    u0 = torch.zeros_like(b) if x0 is None else to_u(x0)
    track = Tracker(b, tol, atol)
    loop(prob, u0, alpha, track, max_iter)
    # true residual under the engine's operator at the result (one product)
    x = track.result
    _check_structure(track, row_norm(b - op.mv(x)), row_norm(b), lambda i, r: (
        f"{name}: splitting structure does not describe the derivative operator (row {i}: residual "
        f"{r:.3e} under the engine's operator); was set_point called with this z*?"))
    return x, track.info(name, "linear", alpha=alpha)


def forward_backward_linear(
    op, b: Tensor, x0: Tensor | None = None, *, splitting: MonotoneSplit, alpha: float | None = None,
    check_alpha: str = "raise", tol: float = 1e-6, atol: float = 0.0, max_iter: int = 1000,
) -> tuple[Tensor, SolveInfo]:
    """FB for the derivative systems with ``I − DW`` (module docstring); α as in
    :func:`forward_backward`."""
    return _linear_solve(_fb_loop, "forward_backward", op, b, x0, splitting,
                         _fb_alpha(splitting, alpha, check_alpha), tol, atol, max_iter)


def peaceman_rachford_linear(
    op, b: Tensor, x0: Tensor | None = None, *, splitting: MonotoneSplit, alpha: float | None = 1.0,
    tol: float = 1e-6, atol: float = 0.0, max_iter: int = 1000,
) -> tuple[Tensor, SolveInfo]:
    """PR for the derivative systems with ``I − DW`` (module docstring); any α > 0."""
    a = 1.0 if alpha is None else float(alpha)
    if not a > 0:
        raise ValueError(f"Peaceman-Rachford alpha must be > 0, got {alpha}")
    return _linear_solve(_pr_loop, "peaceman_rachford", op, b, x0, splitting, a, tol, atol, max_iter)


SPLITTING_SOLVERS = {"fb": forward_backward, "forward_backward": forward_backward,
                     "pr": peaceman_rachford, "peaceman_rachford": peaceman_rachford}
SPLITTING_LINEAR_SOLVERS = {"fb": forward_backward_linear, "forward_backward": forward_backward_linear,
                            "pr": peaceman_rachford_linear, "peaceman_rachford": peaceman_rachford_linear}
