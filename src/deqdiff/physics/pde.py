"""A PDE as data: a residual of named derivatives, a box domain, boundary/initial conditions,
data terms and a collocation sampler; the loss, training, figures and CLI are shared.

Example — the 1-D viscous Burgers equation ``u_t + u u_x = ν u_xx`` (Raissi, Perdikaris &
Karniadakis 2019, sec. 3.1.1) in full::

    import math, torch
    from deqdiff.physics.pde import PDEProblem, Box, Dirichlet, Initial, Uniform

    nu = 0.01 / math.pi
    burgers = PDEProblem(
        domain=Box({"x": (-1.0, 1.0), "t": (0.0, 1.0)}),
        residual=lambda d: d.u_t + d.u * d.u_x - nu * d.u_xx,
        conditions=[Initial(lambda p: -torch.sin(math.pi * p.x), n=200),
                    Dirichlet("x", 0.0, n=200)],
        collocation=Uniform(1000),
    )
    loss = burgers.loss(model, burgers.sample(generator, step=0, model=model))   # LossTerms

The residual reads ``d.u``, ``d.u_t``, ``d.u_x``, ``d.u_xx`` from a lazy
:class:`~deqdiff.physics.fields.Fields`: only those are computed, by implicit forward-mode
solves for a DEQ (:mod:`deqdiff.physics.fields`), by autodiff for other models.

Loss (``mean`` over points and components)::

    L = w_pde·mean(r(X_c)²) + Σ_conditions w_k·mean(g_k(X_k)²) + Σ_data w_j·mean((u(X_j) − u_j)²)

All point sets go through one model call (fixed points are per row), so ``u`` and its
derivatives share one forward solve, one linearization and one adjoint per step.

Conditions: :func:`Dirichlet` (``u = g`` on faces), :func:`Neumann` (``∂u/∂n = g``, outward
normal), :func:`Initial` (``u(X, t₀) = g``, optionally ``u_t``), :class:`Periodic` (``u`` and
its first ``derivatives`` normal derivatives equal on opposite faces), or a general
:class:`BoundaryCondition` on any named field. Samplers: :class:`Uniform` (fresh points every
step), :class:`FixedSet` (drawn once: fixed sets for warm starts), :class:`ResidualResampling`
(residual-based adaptive distribution, RAD; Wu, Zhu, Tan, Kartha & Lu 2023, "A comprehensive
study of non-adaptive and residual-based adaptive sampling for physics-informed neural networks").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .fields import Fields, fields as make_fields
from .losses import LossTerms

__all__ = ["Box", "Interval", "BoundaryCondition", "Dirichlet", "Neumann", "Initial", "Periodic", "Data",
           "Uniform", "FixedSet", "ResidualResampling", "PDEProblem"]

Value = Union[float, Callable[[Fields], Tensor]]
SIDES = ("low", "high", "both")


# --------------------------------------------------------------------------- domains


class Box:
    """The rectangle ``Π_i [low_i, high_i]`` with named coordinates, in the order given
    (``{"x": (-1, 1), "t": (0, 1)}``); points are ``(n, d)`` float64 tensors."""

    def __init__(self, bounds: dict[str, tuple[float, float]]):
        if not bounds:
            raise ValueError("a box needs at least one coordinate")
        for name, (lo, hi) in bounds.items():
            if not (isinstance(name, str) and len(name) == 1):
                raise ValueError(f"coordinate names must be single characters, got {name!r}")
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"coordinate {name}: need finite low < high, got ({lo}, {hi})")
        self.bounds = {k: (float(lo), float(hi)) for k, (lo, hi) in bounds.items()}

    @property
    def coords(self) -> tuple[str, ...]:
        return tuple(self.bounds)

    @property
    def low(self) -> Tensor:
        return torch.tensor([lo for lo, _ in self.bounds.values()], dtype=torch.float64)

    @property
    def high(self) -> Tensor:
        return torch.tensor([hi for _, hi in self.bounds.values()], dtype=torch.float64)

    def index(self, coord: str) -> int:
        if coord not in self.bounds:
            raise ValueError(f"unknown coordinate {coord!r}; the domain has {self.coords}")
        return self.coords.index(coord)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points uniform in the box."""
        u = torch.rand(n, len(self.bounds), generator=generator, dtype=torch.float64)
        return self.low + u * (self.high - self.low)

    def sample_face(self, coord: str, side: str, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points uniform on the face ``coord = low`` / ``high`` (``"both"``: each point
        on either face with probability 1/2)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        i = self.index(coord)
        X = self.sample(n, generator)
        lo, hi = self.bounds[coord]
        if side == "both":
            pick = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
            X[:, i] = torch.where(pick, lo, hi)
        else:
            X[:, i] = lo if side == "low" else hi
        return X

    def grid(self, sizes: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """Axes and the ``(Π sizes, d)`` points of a uniform grid (``ij`` indexing)."""
        axes = [np.linspace(lo, hi, int(s)) for (lo, hi), s in zip(self.bounds.values(), sizes)]
        mesh = np.meshgrid(*axes, indexing="ij")
        return axes, np.stack([m.ravel() for m in mesh], 1)


def Interval(coord: str, low: float, high: float) -> Box:  # noqa: N802 — a domain constructor
    """The 1-D box ``[low, high]``."""
    return Box({coord: (low, high)})


# --------------------------------------------------------------------------- conditions


def _value(value: Value, view: Fields) -> Tensor:
    if callable(value):
        return value(view)
    return torch.full((len(view),), float(value), dtype=view.X.dtype, device=view.X.device)


@dataclass
class BoundaryCondition:
    """``sign·field − value = 0`` on the face(s) ``coord = low/high`` (``n`` points a step)."""

    on: str
    field: str = "u"
    value: Value = 0.0
    side: str = "both"
    n: int = 200
    weight: float = 1.0
    outward_normal: bool = False  # multiply the field by the outward normal's sign (−1 on low)
    name: str | None = None

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.n < 1 or not self.weight >= 0:
            raise ValueError(f"need n ≥ 1 and weight ≥ 0, got n={self.n}, weight={self.weight}")
        self.name = self.name or f"bc_{self.on}"

    def points(self, domain: Box, generator: torch.Generator) -> Tensor:
        return domain.sample_face(self.on, self.side, self.n, generator)

    def residual(self, view: Fields, domain: Box) -> Tensor:
        v = view[self.field]
        if self.outward_normal:
            lo, hi = domain.bounds[self.on]
            x = view[self.on]
            v = torch.where(x <= 0.5 * (lo + hi), -v, v)
        return v - _value(self.value, view)


def Dirichlet(on: str, value: Value = 0.0, *, side: str = "both", output: str = "u", n: int = 200,  # noqa: N802
              weight: float = 1.0) -> BoundaryCondition:
    """``u = value`` on the face(s) of ``on``; ``value`` a number or ``value(points) → (n,)``
    (``points.x`` … are the coordinates)."""
    return BoundaryCondition(on, output, value, side, n, weight, name=f"dirichlet_{on}")


def Neumann(on: str, value: Value = 0.0, *, side: str = "both", output: str = "u", n: int = 200,  # noqa: N802
            weight: float = 1.0) -> BoundaryCondition:
    """``∂u/∂n = value`` with the outward normal (``−u_x`` on ``x = low``, ``u_x`` on ``high``)."""
    return BoundaryCondition(on, f"{output}_{on}", value, side, n, weight, outward_normal=True, name=f"neumann_{on}")


def Initial(value: Value, *, time: str = "t", output: str = "u", order: int = 0, n: int = 200,  # noqa: N802
            weight: float = 1.0) -> BoundaryCondition:
    """``∂^order u/∂t^order (X, t_low) = value`` (``order`` 0: the initial state; 1: its rate)."""
    if order < 0:
        raise ValueError(f"order must be ≥ 0, got {order}")
    name = output + ("_" + time * order if order else "")
    return BoundaryCondition(time, name, value, "low", n, weight, name="initial" + (f"_{order}" if order else ""))


@dataclass
class Periodic:
    """``∂^k u/∂x^k (low) = ∂^k u/∂x^k (high)`` for ``k = 0 … derivatives`` at ``n`` pairs of
    points on opposite faces of ``on`` (same other coordinates)."""

    on: str
    derivatives: int = 1
    outputs: tuple[str, ...] = ("u",)
    n: int = 100
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if self.derivatives < 0 or self.n < 1 or not self.weight >= 0:
            raise ValueError("need derivatives ≥ 0, n ≥ 1 and weight ≥ 0")
        self.name = self.name or f"periodic_{self.on}"

    def points(self, domain: Box, generator: torch.Generator) -> Tensor:
        low = domain.sample_face(self.on, "low", self.n, generator)
        high = low.clone()
        high[:, domain.index(self.on)] = domain.bounds[self.on][1]
        return torch.cat([low, high])

    def residual(self, view: Fields, domain: Box) -> Tensor:
        n = len(view) // 2
        lo, hi = view.rows(slice(0, n)), view.rows(slice(n, None))
        names = [o + ("_" + self.on * k if k else "") for o in self.outputs for k in range(self.derivatives + 1)]
        return torch.stack([lo[m] - hi[m] for m in names], 1)


@dataclass
class Data:
    """Observations ``field(X) = values`` (``X`` ``(n, d)``, ``values`` ``(n,)``)."""

    X: Tensor
    values: Tensor
    field: str = "u"
    weight: float = 1.0
    name: str = "data"

    def __post_init__(self):
        self.X = torch.as_tensor(self.X, dtype=torch.float64)
        self.values = torch.as_tensor(self.values, dtype=torch.float64).reshape(-1)
        if self.X.ndim != 2 or self.X.shape[0] != self.values.shape[0]:
            raise ValueError(f"data: X must be (n, d) and values (n,), got {tuple(self.X.shape)}, {tuple(self.values.shape)}")
        if not (torch.isfinite(self.X).all() and torch.isfinite(self.values).all()):
            raise ValueError("data: X and values must be finite")

    def points(self, domain: Box, generator: torch.Generator) -> Tensor:
        return self.X

    def residual(self, view: Fields, domain: Box) -> Tensor:
        return view[self.field] - self.values.to(view.X)


# --------------------------------------------------------------------------- collocation samplers


@dataclass
class Uniform:
    """``n`` fresh uniform points every step."""

    n: int = 1000

    def points(self, problem: "PDEProblem", model: nn.Module, generator: torch.Generator, step: int) -> Tensor:
        return problem.domain.sample(self.n, generator)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class FixedSet:
    """``n`` uniform points drawn once (on the first step) and reused: the same rows every
    step, so a forward solve can start from the previous step's fixed points."""

    n: int = 1000
    X: Tensor | None = None

    def points(self, problem: "PDEProblem", model: nn.Module, generator: torch.Generator, step: int) -> Tensor:
        if self.X is None:
            self.X = problem.domain.sample(self.n, generator)
        return self.X

    def state_dict(self) -> dict:
        return {"X": self.X}

    def load_state_dict(self, state: dict) -> None:
        self.X = state.get("X")


@dataclass
class ResidualResampling:
    """Residual-based adaptive distribution (RAD, Wu et al. 2023): every ``every`` steps draw
    ``pool_factor·n`` uniform candidates and keep ``n`` of them, without replacement, with
    probability ``∝ |r|^k / mean|r|^k + c`` (``r``: the PDE residual, evaluated without a
    weight graph). The first set (step 0) is uniform."""

    n: int = 1000
    every: int = 100
    pool_factor: int = 8
    k: float = 1.0
    c: float = 1.0
    X: Tensor | None = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        if self.n < 1 or self.every < 1 or self.pool_factor < 1 or not self.k >= 0 or not self.c >= 0:
            raise ValueError("need n, every, pool_factor ≥ 1 and k, c ≥ 0")

    def points(self, problem: "PDEProblem", model: nn.Module, generator: torch.Generator, step: int) -> Tensor:
        if self.X is None:
            self.X = problem.domain.sample(self.n, generator)
        elif step % self.every == 0:
            pool = problem.domain.sample(self.n * self.pool_factor, generator)
            r = problem.pointwise_residual(model, pool).abs().double()
            w = r ** self.k
            p = w / w.mean().clamp_min(1e-300) + self.c
            idx = torch.multinomial(p, self.n, replacement=False, generator=generator)
            self.X = pool[idx]
            self.history.append(step)
        return self.X

    def state_dict(self) -> dict:
        return {"X": self.X, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.X, self.history = state.get("X"), list(state.get("history", []))


# --------------------------------------------------------------------------- the problem


@dataclass
class PDEProblem:
    """A PDE residual on a box with conditions, data and a collocation sampler (module docstring).

    ``residual(d)`` returns ``(B,)`` or ``(B, m)`` from the lazy fields ``d``; ``reference(X)``
    (optional, numpy ``(N, d) → (N,)`` or ``(N, outputs)``) is the solution the evaluation
    compares with. ``solve_options`` go to :func:`deqdiff.physics.fields.fields`."""

    domain: Box
    residual: Callable[[Fields], Tensor]
    conditions: Sequence = ()
    outputs: tuple[str, ...] = ("u",)
    data: Sequence[Data] = ()
    collocation: object = field(default_factory=lambda: Uniform(1000))
    weight: float = 1.0
    reference: Callable[[np.ndarray], np.ndarray] | None = None
    name: str = "pde"
    solve_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.outputs = tuple(self.outputs)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss terms need distinct names, got {names} (pass name=...)")

    @property
    def coords(self) -> tuple[str, ...]:
        return self.domain.coords

    @property
    def terms(self) -> list:
        return [*self.conditions, *self.data]

    def sample(self, generator: torch.Generator, step: int, model: nn.Module) -> dict[str, Tensor]:
        """The points of one step: ``{"pde": collocation, <term name>: points, …}`` (float64)."""
        batch = {"pde": self.collocation.points(self, model, generator, step)}
        for t in self.terms:
            batch[t.name] = t.points(self.domain, generator)
        return batch

    def fields(self, model: nn.Module, X: Tensor, graph: bool = True) -> Fields:
        p = next(model.parameters())
        return make_fields(model, X.to(dtype=p.dtype, device=p.device), self.coords, self.outputs, graph=graph,
                           **self.solve_options)

    def pointwise_residual(self, model: nn.Module, X: Tensor) -> Tensor:
        """``‖r(X_b)‖`` per point, without a weight graph."""
        r = self.residual(self.fields(model, X, graph=False)).detach()
        return r.reshape(r.shape[0], -1).norm(dim=1)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> LossTerms:
        """The weighted loss of one batch (module docstring): one model call for all points."""
        sizes = [batch[k].shape[0] for k in batch]
        d = self.fields(model, torch.cat(list(batch.values())))
        views, start = {}, 0
        for k, n in zip(batch, sizes):
            views[k], start = d.rows(slice(start, start + n)), start + n
        r = self.residual(views["pde"])
        mse = (r * r).mean()
        total, terms = self.weight * mse, {"pde": float(mse.detach())}
        for t in self.terms:
            g = t.residual(views[t.name], self.domain)
            m = (g * g).mean()
            total = total + t.weight * m
            terms[t.name] = float(m.detach())
        iters = getattr(model, "last_iterations", None)
        if isinstance(iters, Tensor):
            terms["iters_mean"], terms["iters_max"] = float(iters.float().mean()), float(iters.max())
        terms["total"] = float(total.detach())
        return LossTerms(total, terms)

    def state_dict(self) -> dict:
        return {"collocation": self.collocation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.collocation.load_state_dict(state["collocation"])
