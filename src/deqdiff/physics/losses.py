"""Physics-informed losses for models ``x ↦ y`` (``(B, d_in) → (B, d_out)``).

The physics term needs ``∂y/∂t`` where ``t`` is a column of the inputs. For a DEQ it is
``∂y/∂t = ∂n_post/∂z · J_{z*,t}`` with ``J_{z*,t} = (I − J_{f,z})⁻¹ J_{f,t}`` (Pacheco 2023,
eq. deq-jacobian). By default (``derivative_mode="forward"``, :func:`output_tangent`) it is one
forward-mode pass with tangent ``e_t`` (``torch.autograd.forward_ad``): through
:func:`deqdiff.fixed_point` that is one implicit solve ``(I − J) ż = ∂f/∂t`` for all outputs at
once, and ``y`` comes from the same pass. ``"reverse"`` (:func:`output_gradient`) uses
``torch.autograd.grad(y[:, i].sum(), x, create_graph=True)``: one adjoint solve per output
component, or, where ``x`` is the time alone (one number per sample), one tangent solve that the
engine shares between the outputs. Either is kept in the graph. The gradient of the loss w.r.t. the weights then
differentiates that derivative once more — Pacheco 2023, eq. hessian-t and "Computing gradients
through derivatives of DEQs" — which the engine again does by implicit solves (never by
unrolling). Because fixed points are
per sample, the gradient of ``y[:, i].sum()`` w.r.t. ``x`` is ``∂y_i/∂x`` row by row.

Loss (weights ``w``; ``F`` is the user's right-hand side ``dy/dt = F(t, y[, args])``)::

    L = w_ic·mean‖y(x_ic) − y_ic‖² + w_phys·mean‖∂y/∂t − F(t, y, args)‖²
        + w_data·mean‖y(x_d) − y_d‖² + w_jac·mean_b ‖∂f/∂z (z*_b)‖_F

(the physics residual optionally multiplied per sample by ``residual_weight(x)``).

(``mean`` over samples and components.) The Jacobian term is evaluated at the collocation
points' z*; ``jacobian_method="exact"`` uses the model's closed form (``TanhCell``: exact for
any width), ``"hutchinson"`` an unbiased estimate of ``‖J‖_F²`` from one Rademacher probe per
sample (then square-rooted), for cells without a closed form.

Stable API: ``output_gradient(y, x, column)``, ``output_tangent(model, x, column)``,
``ode_residual(model, x, rhs, ..., mode="forward")``,
``hutchinson_frobenius(f, z, *args, generator=None)``, ``jacobian_penalty(model, ...)``,
``PhysicsLoss`` (``__call__(model, collocation, ic=None, data=None, generator=None) -> LossTerms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..engine.validation import all_finite

__all__ = ["output_gradient", "output_tangent", "ode_residual", "hutchinson_frobenius", "jacobian_penalty",
           "PhysicsLoss", "LossTerms", "check_finite"]


def check_finite(name: str, *tensors: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` when a tensor holds NaN or Inf."""
    for t in tensors:
        if t is not None and t.is_floating_point() and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} contains {bad} NaN/Inf value(s) (shape {tuple(t.shape)})")


def output_gradient(y: Tensor, x: Tensor, column: int = 0, *, create_graph: bool = True) -> Tensor:
    """``∂y_i/∂x_column`` for every output ``i`` and sample: ``(B, d_out)``.

    One reverse pass per output component (through a DEQ: one implicit adjoint solve each).
    ``x`` must require grad and ``y`` must be computed from it row by row."""
    if not x.requires_grad:
        raise ValueError("x must require grad to differentiate the model's output by one of its columns")
    cols = []
    for i in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        cols.append(g[:, column])
    return torch.stack(cols, 1)


def output_tangent(model: Callable[[Tensor], Tensor], x: Tensor, column: int = 0) -> tuple[Tensor, Tensor]:
    """``(y, ∂y/∂x_column)`` of ``y = model(x)`` by one forward-mode pass (tangent ``e_column``
    on every row), differentiable w.r.t. the model's weights (backward over forward). Through
    a DEQ the tangent is one implicit solve for all outputs; ``model`` must act row by row."""
    x = x.detach()
    tangent = torch.zeros_like(x)
    tangent[:, column] = 1.0
    with fwAD.dual_level():
        y, dy = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent)))
    return y, (torch.zeros_like(y) if dy is None else dy)


MODES = ("forward", "reverse")


def _call_rhs(rhs: Callable, t: Tensor, y: Tensor, args) -> Tensor:
    out = rhs(t, y) if args is None else rhs(t, y, args)
    if out.shape != y.shape:
        raise ValueError(f"rhs returned shape {tuple(out.shape)}, expected {tuple(y.shape)} (like y)")
    return out


def _output_and_time_derivative(model, x: Tensor, column: int, mode: str) -> tuple[Tensor, Tensor]:
    if mode == "forward":
        return output_tangent(model, x, column)
    if mode == "reverse":
        x = x.detach().requires_grad_(True)
        y = model(x)
        return y, output_gradient(y, x, column)
    raise ValueError(f"derivative mode must be one of {MODES}, got {mode!r}")


def ode_residual(model: nn.Module, x: Tensor, rhs: Callable, *, time_column: int = 0,
                 rhs_args: Callable[[Tensor], Any] | None = None,
                 time_of: Callable[[Tensor], Tensor] | None = None,
                 mode: str = "forward") -> tuple[Tensor, Tensor]:
    """``(r, y)`` with ``r = ∂y/∂t − F(t, y[, args])`` at the inputs ``x``; ``∂y/∂t`` by
    forward mode (:func:`output_tangent`) or reverse mode (:func:`output_gradient`, from a
    leaf that requires grad made from ``x``). ``t = time_of(x)`` (default
    ``x[:, time_column]``; the conditioned flow maps pass ``Δ`` — an autonomous F does not
    care); ``args = rhs_args(x)``."""
    x = x.detach()
    y, dy = _output_and_time_derivative(model, x, time_column, mode)
    return _residual(rhs, x, y, dy, time_column, rhs_args, time_of), y


def _residual(rhs, x: Tensor, y: Tensor, dy: Tensor, time_column: int, rhs_args, time_of) -> Tensor:
    """``dy − F(t, y[, args])`` with ``t`` and ``args`` read off the inputs ``x``."""
    t = x[:, time_column] if time_of is None else time_of(x)
    return dy - _call_rhs(rhs, t, y, None if rhs_args is None else rhs_args(x))


def hutchinson_frobenius(f: Callable[..., Tensor], z: Tensor, *args, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample estimate of ``‖∂f/∂z‖_F`` at ``z`` (rows = samples): ``E_v‖vᵀ J‖² = ‖J‖_F²``
    with Rademacher ``v``; returns ``sqrt`` of the one-probe estimate (differentiable)."""
    z = z if z.requires_grad else z.detach().requires_grad_(True)
    fz = f(z, *args)
    v = torch.randint(0, 2, fz.shape, generator=generator, dtype=torch.int64).to(fz) * 2 - 1
    (vj,) = torch.autograd.grad(fz, z, v, create_graph=True)
    return torch.sqrt((vj * vj).sum(1) + 1e-12)


def jacobian_penalty(model: nn.Module, method: str = "exact", *, x: Tensor | None = None,
                     generator: torch.Generator | None = None, rows: int | None = None) -> Tensor:
    """``mean_b ‖∂f/∂z‖_F`` at the model's last fixed point (``model.last_z`` / ``model.core.last_z``),
    over its first ``rows`` samples (default all).

    ``"exact"`` needs ``model.jacobian_frobenius``; ``"hutchinson"`` needs ``model.cell`` (or
    ``model.core.cell``) and the cell input ``x`` of those samples."""
    core = getattr(model, "core", model)
    z = getattr(core, "last_z", None)
    if method == "exact":
        if not hasattr(model, "jacobian_frobenius"):
            raise ValueError(f"{type(model).__name__} has no exact jacobian_frobenius; use method='hutchinson'")
        return model.jacobian_frobenius(None if z is None else z[:rows]).mean()
    if method == "hutchinson":
        if x is None or z is None:
            raise ValueError("hutchinson jacobian penalty needs the cell input x and a previous model call")
        return hutchinson_frobenius(core.cell, z[:rows], x, generator=generator).mean()
    raise ValueError(f"jacobian_method must be 'exact' or 'hutchinson', got {method!r}")


@dataclass
class LossTerms:
    """The total loss (a tensor with graph) and each weighted term's unweighted value."""

    total: Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class PhysicsLoss:
    """Weighted physics-informed loss for an ODE ``dy/dt = F(t, y[, args])`` (module docstring).

    ``rhs(t, y)`` or ``rhs(t, y, args)`` with ``args = rhs_args(x)``; ``t = x[:, time_column]``
    (or ``time_of(x)``). Call with collocation inputs (physics term), optional ``ic=(x0, y0)``
    and ``data=(x, y)`` pairs. The Jacobian penalty (``jacobian_weight > 0``) is taken at the
    collocation points' fixed points; ignored for models without one (MLP). ``residual_weight(x)``
    (optional, ``(B,)``) rescales each sample's residual, e.g. ``h²/Δ²`` for a flow map whose
    Taylor skip makes the residual ``O(Δ²)``, so that every collocation point counts.
    ``derivative_mode``: ``"forward"`` (one implicit tangent solve for ∂y/∂t, default) or
    ``"reverse"`` (one adjoint solve per output, or one shared tangent solve where the input is
    the time alone); both exact, forward needs no more solves."""

    rhs: Callable[..., Tensor]
    time_column: int = 0
    rhs_args: Callable[[Tensor], Any] | None = None
    time_of: Callable[[Tensor], Tensor] | None = None
    physics_weight: float = 1.0
    ic_weight: float = 1.0
    data_weight: float = 1.0
    jacobian_weight: float = 0.0
    jacobian_method: str = "exact"
    residual_weight: Callable[[Tensor], Tensor] | None = None
    derivative_mode: str = "forward"

    def __post_init__(self):
        for name in ("physics_weight", "ic_weight", "data_weight", "jacobian_weight"):
            w = getattr(self, name)
            if not (w >= 0 and w < float("inf")):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {w}")
        if self.derivative_mode not in MODES:
            raise ValueError(f"derivative_mode must be one of {MODES}, got {self.derivative_mode!r}")

    def __call__(self, model: nn.Module, collocation: Tensor, ic: tuple[Tensor, Tensor] | None = None,
                 data: tuple[Tensor, Tensor] | None = None, generator: torch.Generator | None = None) -> LossTerms:
        """In forward mode the initial-condition and data inputs join the collocation points in
        one model call (rows are independent fixed points): one forward solve and one z*
        adjoint for all, instead of one more of each per extra set of points."""
        check_finite("collocation points", collocation)
        fits: list[tuple[str, Tensor, Tensor, float]] = []
        for name, pair, w in (("ic", ic, self.ic_weight), ("data", data, self.data_weight)):
            if pair is not None and w != 0:
                check_finite(f"{name} inputs", pair[0])
                check_finite(f"{name} targets", pair[1])
                fits.append((name, pair[0], pair[1], w))
        total = collocation.new_zeros(())
        terms: dict[str, float] = {}
        outputs: list[Tensor] = []
        if self.physics_weight > 0 or self.jacobian_weight > 0:
            n = collocation.shape[0]
            merge = bool(fits) and self.derivative_mode == "forward" and all(
                xs.shape[1:] == collocation.shape[1:] and xs.dtype == collocation.dtype for _, xs, _, _ in fits)
            x_all = torch.cat([collocation, *(xs for _, xs, _, _ in fits)]) if merge else collocation
            y_all, dy_all = _output_and_time_derivative(model, x_all.detach(), self.time_column, self.derivative_mode)
            if merge:
                outputs = list(y_all[n:].split([xs.shape[0] for _, xs, _, _ in fits]))
            r = _residual(self.rhs, collocation.detach(), y_all[:n], dy_all[:n], self.time_column,
                          self.rhs_args, self.time_of)
            if self.residual_weight is not None:  # per-sample w(x): mean‖w(x)·r‖²
                r = r * self.residual_weight(collocation).reshape(-1, 1)
            phys = (r * r).mean()
            total = total + self.physics_weight * phys
            terms["physics"] = float(phys.detach())
            iters = getattr(getattr(model, "core", model), "last_iterations", None)
            if iters is not None:  # forward-solver iterations at the collocation points
                terms["iters_mean"] = float(iters[:n].float().mean())
                terms["iters_max"] = float(iters[:n].max())
            if self.jacobian_weight > 0 and _has_fixed_point(model):
                x_cell = model.features(collocation) if hasattr(model, "features") else collocation
                jac = jacobian_penalty(model, self.jacobian_method, x=x_cell, generator=generator, rows=n)
                total = total + self.jacobian_weight * jac
                terms["jacobian"] = float(jac.detach())
        for k, (name, xs, ys, w) in enumerate(fits):
            err = (outputs[k] if outputs else model(xs)) - ys
            mse = (err * err).mean()
            total = total + w * mse
            terms[name] = float(mse.detach())
        terms["total"] = float(total.detach())
        return LossTerms(total, terms)


def _has_fixed_point(model: nn.Module) -> bool:
    core = getattr(model, "core", model)
    return getattr(core, "deq", None) is not None
