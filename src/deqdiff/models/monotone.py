"""Monotone DEQs (Winston & Kolter 2020; Nguyen 2022 §2.3.2 and §3.2).

The equilibrium ``z* = σ(W z* + U x + b)`` with ``W = (1 − m)I − AᵀA + B − Bᵀ`` (Nguyen 2022
Proposition 1, eq. 3.3): for every A, B the symmetric part of ``I − W`` is ``mI + AᵀA ⪰ mI``,
so the fixed point exists, is unique, and operator splitting finds it
(:mod:`deqdiff.solvers.splitting`). z* comes out of the generic engine (``deqdiff.DEQ``), so
every derivative order is an implicit solve; the splitting is only the forward (and
optionally the derivative) solver.

Lipschitz bounds (Nguyen 2022 Proposition 3, Lemma 3.3.3; proof of C.0.3 generalized to a bias):
with ``c = Ux + b`` and σ a prox with σ(0) = 0, monotonicity of ∂f gives
``⟨c, z*⟩ ≥ ⟨(I − W) z*, z*⟩ ≥ m‖z*‖²``, so ``‖z*‖ ≤ ‖Ux + b‖/m ≤ (‖U‖₂‖x‖ + ‖b‖)/m``; for two
inputs (any prox σ) ``‖z₁* − z₂*‖ ≤ ‖U(x₁ − x₂)‖/m``: ``x ↦ z*`` is ``‖U‖₂/m``-Lipschitz.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from ..solvers.splitting import (
    SPLITTING_LINEAR_SOLVERS,
    SPLITTING_SOLVERS,
    DenseMonotone,
    MonotoneSplit,
    fb_contraction_factor,
    get_activation,
)

__all__ = [
    "MonotoneLinear",
    "MonotoneDEQ",
    "MonotoneModelMixin",
    "fb_contraction_factor",
    "fb_alpha_bound",
    "state_norm_bound",
    "lipschitz_bound",
]


def fb_alpha_bound(m: float, L: float) -> float:
    """Admissible forward–backward steps are α ∈ (0, 2m/L²) (Proposition 3)."""
    return 2.0 * m / L**2


def state_norm_bound(U_norm: float, x_norm: Tensor, m: float, b_norm: float = 0.0) -> Tensor:
    """Lemma 3.3.3: ``‖z*‖ ≤ (‖U‖₂‖x‖ + ‖b‖)/m`` (Nguyen 2022 has b = 0)."""
    return (U_norm * x_norm + b_norm) / m


def lipschitz_bound(U_norm: float, m: float) -> float:
    """Lipschitz constant of ``x ↦ z*``: ``‖U‖₂/m``."""
    return U_norm / m


class MonotoneLinear(nn.Module):
    """Cell ``f(z, x) = σ(W z + U x + b)`` with ``W = (1 − m)I − AᵀA + B − Bᵀ`` on rows
    ``z`` ``(batch, width)``, ``x`` ``(batch, in_features)``. ``W z`` is applied without
    forming W (three products), so the engine's per-iteration cost is O(width²)."""

    def __init__(self, in_features: int, width: int, *, m: float = 0.05, activation: str = "relu", **act_kwargs):
        super().__init__()
        if not m > 0:
            raise ValueError(f"monotonicity parameter m must be > 0, got {m}")
        self.in_features, self.width, self.m = in_features, width, float(m)
        self.activation = get_activation(activation, **act_kwargs)
        self.U = nn.Linear(in_features, width)
        self.A = nn.Linear(width, width, bias=False)
        self.B = nn.Linear(width, width, bias=False)

    def weight(self) -> Tensor:
        """Dense ``W`` (width × width)."""
        A, B = self.A.weight, self.B.weight
        eye = torch.eye(self.width, dtype=A.dtype, device=A.device)
        return (1 - self.m) * eye - A.T @ A + B - B.T

    def multiply(self, z: Tensor) -> Tensor:
        """Rows of ``W z``: ``(1 − m)z − Aᵀ(A z) + B z − Bᵀ z``."""
        A, B = self.A.weight, self.B.weight
        return (1 - self.m) * z - F.linear(F.linear(z, A), A.T) + F.linear(z, B) - F.linear(z, B.T)

    def inject(self, x: Tensor) -> Tensor:
        return self.U(x)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.activation(self.multiply(z) + self.inject(x))

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.width)

    def structure(self, x: Tensor) -> MonotoneSplit:
        """Detached numeric structure for the splitting solvers at input ``x``."""
        with torch.no_grad():
            return DenseMonotone(self.weight().detach(), self.inject(x.detach()), self.activation, self.m)

    def injection_norm(self) -> float:
        """‖U‖₂."""
        return float(torch.linalg.matrix_norm(self.U.weight.detach(), 2))

    def op_norm(self) -> float:
        """L = ‖I − W‖₂."""
        eye = torch.eye(self.width, dtype=self.A.weight.dtype, device=self.A.weight.device)
        return float(torch.linalg.matrix_norm(eye - self.weight().detach(), 2))

    def state_norm_bound(self, x: Tensor) -> Tensor:
        """Per-sample bound ``(‖U‖₂‖x‖ + ‖b‖)/m`` on ‖z*‖ (needs σ(0) = 0)."""
        if not self.activation.zero_at_zero:
            raise ValueError(f"the state bound needs σ(0) = 0, which {self.activation!r} does not satisfy")
        x = x.reshape(x.shape[0], -1)
        return state_norm_bound(self.injection_norm(), x.norm(dim=1), self.m, float(self.U.bias.detach().norm()))

    def lipschitz_bound(self) -> float:
        """Lipschitz constant ``‖U‖₂/m`` of ``x ↦ z*``."""
        return lipschitz_bound(self.injection_norm(), self.m)

    def fb_contraction_factor(self, alpha: float) -> float:
        """Proposition 3 bound on the Lipschitz constant of the FB operator T_α."""
        return fb_contraction_factor(alpha, self.m, self.op_norm())


class MonotoneModelMixin:
    """Solver plumbing shared by the monotone models: ``solver`` / ``backward_solver`` may be
    ``"pr"``, ``"fb"`` (splitting, structure built from the batch) or any engine solver."""

    cell: nn.Module
    deq: DEQ

    @property
    def cell(self) -> nn.Module:
        """The monotone cell, registered once (under ``deq``) so that
        ``torch.func.functional_call`` over the model swaps its parameters back correctly."""
        return self.deq.cell

    def _configure(self, solver, alpha, tol, max_iter, backward_solver, backward_alpha, solver_options):
        self.solver, self.alpha, self.backward_solver = solver, alpha, backward_solver
        self.backward_alpha = backward_alpha
        self.solver_options = dict(tol=tol, max_iter=max_iter, **solver_options)

    def equilibrium(self, x: Tensor, **overrides) -> Tensor:
        """z* for a batch ``x`` (overrides: ``solver``, ``alpha``, ``tol``, ``max_iter``,
        ``store_trajectory``, ``backward_solver``, ``backward_alpha``, any fixed_point option)."""
        opts = {**self.solver_options, **overrides}
        solver = opts.pop("solver", self.solver)
        alpha = opts.pop("alpha", self.alpha)
        bsolver = opts.pop("backward_solver", self.backward_solver)
        balpha = opts.pop("backward_alpha", self.backward_alpha)
        x = self._prepare(x)
        split = None
        if isinstance(solver, str) and solver in SPLITTING_SOLVERS:
            split = self.cell.structure(x)
            opts.update(solver=SPLITTING_SOLVERS[solver], splitting=split)
            if alpha is not None:
                opts["alpha"] = alpha
        else:
            opts["solver"] = solver
        if isinstance(bsolver, str) and bsolver in SPLITTING_LINEAR_SOLVERS:
            split = split if split is not None else self.cell.structure(x)
            bopts = {**(opts.get("backward_options") or {}), "splitting": split}
            if balpha is not None:
                bopts["alpha"] = balpha
            opts.update(backward_solver=SPLITTING_LINEAR_SOLVERS[bsolver], backward_options=bopts)
        else:
            opts["backward_solver"] = bsolver
        z = self.deq(x, **opts)
        if split is not None:
            split.set_point(z.detach().reshape(split.c.shape))
        return z

    def _prepare(self, x: Tensor) -> Tensor:
        return x


class MonotoneDEQ(MonotoneModelMixin, nn.Module):
    """Classifier ``x ↦ z* = σ(W z* + U x + b) ↦ head(z*)`` on flattened inputs.

    ``solver``: ``"pr"`` (Peaceman–Rachford, default, ``alpha`` = 1), ``"fb"``
    (forward–backward, ``alpha`` default m/L²) or any engine solver (``"anderson"`` …).
    ``backward_solver``: an engine linear solver (``"auto"``) or ``"pr"``/``"fb"``."""

    def __init__(
        self,
        in_features: int,
        width: int,
        num_classes: int,
        *,
        m: float = 0.05,
        solver: str = "pr",
        alpha: float | None = None,
        tol: float = 1e-4,
        max_iter: int = 100,
        activation: str = "relu",
        backward_solver: str = "auto",
        backward_alpha: float | None = None,
        **solver_options,
    ):
        super().__init__()
        # the cell is registered once, under the DEQ: a module registered twice breaks
        # torch.func.functional_call's swap-back (parameters come back as plain tensors)
        self.deq = DEQ(MonotoneLinear(in_features, width, m=m, activation=activation))
        self.head = nn.Linear(width, num_classes)
        self._configure(solver, alpha, tol, max_iter, backward_solver, backward_alpha, solver_options)

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.cell.in_features:
            raise ValueError(f"MonotoneDEQ expects {self.cell.in_features} input features, got {x.shape[1]}")
        return x

    def forward(self, x: Tensor, **overrides) -> Tensor:
        return self.head(self.equilibrium(x, **overrides))
