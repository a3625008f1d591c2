"""Named derivatives of a model's outputs by its input coordinates: ``u``, ``u_t``, ``u_x``,
``u_xx``, ``u_xy``, ``u_xxx``, ``v_t`` … in any number of dimensions, computed lazily — only
the names a residual reads — and kept with their graph w.r.t. the weights.

Names: with coordinates ``("x", "t")`` and outputs ``("u",)``, ``"x"`` and ``"t"`` are the
coordinate columns ``(B,)``, ``"u"`` the output ``(B,)``, and ``"u_" + letters`` the mixed
partial derivative by those coordinates in any order (``u_xt`` = ``u_tx``). Coordinate names
must be single characters; output names must not clash with them.

Two engines compute the derivatives:

* **implicit** (models with ``deq``, ``features`` and ``readout``, ``mode == "implicit"``,
  e.g. :class:`~deqdiff.physics.coordinate_models.CoordinatePIDEQ`): ``z* = f(z*, φ(X))`` is
  solved once without a graph, re-entered into :func:`deqdiff.fixed_point` once, and every
  derivative ``z_S = ∂^S z*`` (``S`` a multiset of coordinates) solves

      (I − J) z_S = ∂^S [f(Z(ε), φ(X + Σ_i ε_i e_{s_i}))]|_{ε=0, z_S := 0},
      Z(ε) = Σ_{T ⊆ S} (Π_{i∈T} ε_i) z_T,

  the mixed derivative of ``f`` along the chain rule of all lower ``z_T`` (Faà di Bruno's
  formula; for ``|S| = 1, 2`` this is Pacheco 2023, eq. deq-jacobian, and the second-order
  ``(I − J) z_xx = D²f[(z_x, ẋ), (z_x, ẋ)]`` of ``deqdiff.derivatives``). The right-hand
  side is a nested forward-mode ``torch.func.jvp`` through ``f`` itself; every solve uses the
  one linearization of ``I − J`` at z* (:class:`deqdiff.derivatives._problem.Equilibrium`), so
  ``u_xxx`` costs three solves (``z_x``, ``z_xx``, ``z_xxx``) and ``u_xx + u_yy`` four. The
  outputs are ``∂^S readout(Z(ε), φ(X + …))``. Each solve is a differentiable engine node: the
  gradient of a loss on the residual w.r.t. the weights runs adjoint solves, never unrolls.
* **autodiff** (any other model: an MLP, an unrolled DEQ): repeated
  ``torch.autograd.grad(..., create_graph=True)`` by the input coordinates.

Stable API: ``Fields`` (``fields[name]``, ``fields.name``, ``fields.rows(slice)``,
``fields.computed``), ``fields(model, X, coords, outputs, graph=True, **solve_options)``,
``parse_name(name, coords, outputs)``, ``uses_implicit(model)``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..derivatives._problem import Equilibrium

__all__ = ["Fields", "fields", "parse_name", "uses_implicit", "nested_mixed_derivative"]


def parse_name(name: str, coords: Sequence[str], outputs: Sequence[str]) -> tuple[str, int, tuple[int, ...]]:
    """``("coord", i, ())`` for a coordinate, ``("field", output index, sorted coordinate
    indices)`` for an output or its derivative; ``KeyError`` naming the valid names otherwise."""
    if name in coords:
        return "coord", coords.index(name), ()
    base, _, suffix = name.partition("_")
    if base in outputs and (suffix or not name.endswith("_")) and all(c in coords for c in suffix):
        return "field", outputs.index(base), tuple(sorted(coords.index(c) for c in suffix))
    raise KeyError(f"{name!r} is not a coordinate {tuple(coords)} nor an output {tuple(outputs)} "
                   f"or its derivative (e.g. {outputs[0]}_{coords[0] * 2})")


class Fields:
    """Lazy ``name → (B,)`` tensors over the points ``X`` ``(B, d)`` (module docstring).

    ``compute(key)`` returns all outputs' derivative ``∂^key`` as ``(B, n_outputs)``; results
    are cached, so a name read twice (or by two loss terms) costs once. ``computed`` lists the
    derivative keys evaluated so far."""

    def __init__(self, X: Tensor, coords: Sequence[str], outputs: Sequence[str],
                 compute: Callable[[tuple[int, ...]], Tensor], rows: slice | Tensor | None = None):
        self._X, self._coords, self._outputs, self._compute = X, tuple(coords), tuple(outputs), compute
        self._rows = rows

    @property
    def X(self) -> Tensor:
        return self._X if self._rows is None else self._X[self._rows]

    def __len__(self) -> int:
        return self.X.shape[0]

    def rows(self, rows: slice | Tensor) -> "Fields":
        """The same fields restricted to ``rows`` (a slice or an index tensor of this view)."""
        if self._rows is not None:
            rows = torch.arange(self._X.shape[0], device=self._X.device)[self._rows][rows]
        return Fields(self._X, self._coords, self._outputs, self._compute, rows)

    def __getitem__(self, name: str) -> Tensor:
        kind, i, key = parse_name(name, self._coords, self._outputs)
        full = self._X[:, i] if kind == "coord" else self._compute(key)[:, i]
        return full if self._rows is None else full[self._rows]

    def __getattr__(self, name: str) -> Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(err.args[0]) from None

    @property
    def computed(self) -> list[tuple[int, ...]]:
        return list(getattr(self._compute, "cache", {}))


def uses_implicit(model: nn.Module) -> bool:
    """Whether ``model`` offers the implicit engine's protocol (``deq``, ``features``,
    ``readout``) and is in implicit mode."""
    return (getattr(model, "deq", None) is not None and hasattr(model, "readout") and hasattr(model, "features")
            and getattr(model, "mode", "implicit") == "implicit")


def fields(model: nn.Module, X: Tensor, coords: Sequence[str], outputs: Sequence[str] = ("u",), *,
           graph: bool = True, **solve_options) -> Fields:
    """Lazy named derivatives of ``model`` at the points ``X`` ``(B, len(coords))``.

    ``graph=False`` returns detached values (e.g. to rank points by their residual).
    ``solve_options`` (implicit engine): ``tol`` (derivative solves and the re-entry of z*),
    ``on_fail``, ``solver`` (derivative solver), ``max_iter``, and ``forward`` (a dict of
    overrides for the model's forward solve)."""
    if X.ndim != 2 or X.shape[1] != len(coords):
        raise ValueError(f"points must have shape (B, {len(coords)}) for coordinates {tuple(coords)}, got {tuple(X.shape)}")
    if len(set(coords)) != len(coords) or any(len(c) != 1 for c in coords):
        raise ValueError(f"coordinate names must be distinct single characters, got {tuple(coords)}")
    if set(outputs) & set(coords) or any("_" in o for o in outputs):
        raise ValueError(f"output names {tuple(outputs)} must not be coordinates nor contain '_'")
    engine = _Implicit(model, X, graph, **solve_options) if uses_implicit(model) else _Autodiff(model, X, graph)
    return Fields(X.detach(), coords, outputs, engine)


def nested_mixed_derivative(g: Callable[..., Tensor], k: int, like: Tensor) -> Tensor:
    """``∂^k g(ε_1, …, ε_k) / ∂ε_1 ⋯ ∂ε_k`` at ε = 0 by ``k`` nested forward-mode
    ``torch.func.jvp`` (ε are 0-dim tensors of ``like``'s dtype and device)."""
    zero = like.new_zeros(())
    one = like.new_ones(())

    def d(h: Callable, i: int) -> Callable:
        def dh(*eps):
            return torch.func.jvp(lambda e: h(*eps[:i], e, *eps[i + 1:]), (eps[i],), (one,))[1]
        return dh

    for i in range(k):
        g = d(g, i)
    return g(*([zero] * k))


class _Implicit:
    """The implicit engine: one forward solve, one re-entry, one solve per distinct ``z_S``."""

    def __init__(self, model: nn.Module, X: Tensor, graph: bool, *, tol: float | None = None,
                 on_fail: str = "warn", forward: dict | None = None, **solve_options):
        cell = model.deq.cell
        X = X.detach()
        theta = dict(cell.named_parameters())
        features = model.features

        def f(z: Tensor, Xp: Tensor, params: dict) -> Tensor:
            return functional_call(cell, params, (z, features(Xp)))

        with torch.no_grad():
            z0 = model.deq(features(X), **(forward or {}))
        info = getattr(model.deq, "last_info", None)
        self.forward_info = None if info is None else info.forward
        if self.forward_info is not None and hasattr(model, "last_iterations"):
            model.last_iterations = self.forward_info.iterations  # per-row forward iterations
        fwd_tol = model.deq.solver_options.get("tol", 1e-6)
        tol = fwd_tol if tol is None else tol
        self.eq = Equilibrium(f, z0, (X, theta), (), batch_ndim=1, graph=graph, tol=tol, z_tol=max(fwd_tol, tol),
                              on_fail=on_fail, **solve_options)
        self.model, self.X, self.graph = model, X, graph
        self.z: dict[tuple[int, ...], Tensor] = {(): self.eq.z}
        self.cache: dict[tuple[int, ...], Tensor] = {}
        self.dim = X.shape[1]

    def _expand(self, fn: Callable[[Tensor, Tensor], Tensor], key: tuple[int, ...], include_top: bool) -> Tensor:
        """``∂^key fn(Z(ε), X + Σ ε_i e_{key_i})`` at ε = 0 (``z_key`` left out unless ``include_top``)."""
        k = len(key)
        subsets = [T for r in range(1, k + 1) for T in itertools.combinations(range(k), r)
                   if include_top or r < k]
        terms = [(T, self.z_of(tuple(sorted(key[i] for i in T)))) for T in subsets]
        B = self.X.shape[0]
        # Z(ε) and X(ε) as matrix products, not broadcasting sums: broadcasting arithmetic runs
        # through slow Python decompositions under nested forward-mode AD
        stack = torch.stack([zT.reshape(-1) for _, zT in terms]) if terms else None
        onehot = torch.eye(self.dim, dtype=self.X.dtype, device=self.X.device)[list(key)]  # (k, d)
        ones = self.X.new_ones(B, 1)

        def g(*eps):
            Z = self.z[()]
            if k:
                e = torch.stack(eps)
                coef = torch.stack([math.prod(eps[i] for i in T) for T, _ in terms]) if terms else None
                if terms:
                    Z = Z + (coef[None] @ stack).reshape(Z.shape)
                Xe = torch.addmm(self.X, ones, (e[None] @ onehot))
            else:
                Xe = self.X
            return fn(Z, Xe)

        return nested_mixed_derivative(g, k, self.X)

    def z_of(self, key: tuple[int, ...]) -> Tensor:
        if key not in self.z:
            eq = self.eq
            rhs = self._expand(lambda Z, Xe: eq.f(Z, Xe, *eq.leaves[1:]), key, include_top=False)
            self.z[key] = eq.solve(rhs)
        return self.z[key]

    def __call__(self, key: tuple[int, ...]) -> Tensor:
        if key not in self.cache:
            model = self.model
            out = self._expand(lambda Z, Xe: model.readout(Z, model.features(Xe)), key, include_top=True)
            self.cache[key] = out if self.graph else out.detach()
        return self.cache[key]

    @property
    def solves(self) -> int:
        return len(self.z) - 1


class _Autodiff:
    """Reverse-mode autograd by the coordinates (``create_graph``), one pass per output and
    derivative key; the gradient of a key serves all its one-higher keys."""

    def __init__(self, model: nn.Module, X: Tensor, graph: bool):
        self.X = X.detach().requires_grad_(True)
        with torch.enable_grad():
            u = model(self.X)
        self.graph = graph
        self.values: dict[tuple[int, ...], Tensor] = {(): u}
        self.grads: dict[tuple[int, ...], Tensor] = {}
        self.cache: dict[tuple[int, ...], Tensor] = {}

    def _value(self, key: tuple[int, ...]) -> Tensor:
        if key not in self.values:
            parent = key[:-1]
            if parent not in self.grads:
                up = self._value(parent)
                cols = []
                with torch.enable_grad():
                    for j in range(up.shape[1]):
                        g = None
                        if up.requires_grad:  # else constant in X (e.g. the slope of a linear field)
                            (g,) = torch.autograd.grad(up[:, j].sum(), self.X, create_graph=True,
                                                       retain_graph=True, allow_unused=True)
                        cols.append(torch.zeros_like(self.X) if g is None else g)
                self.grads[parent] = torch.stack(cols, 1)  # (B, outputs, coords)
            self.values[key] = self.grads[parent][:, :, key[-1]]
        return self.values[key]

    def __call__(self, key: tuple[int, ...]) -> Tensor:
        if key not in self.cache:
            v = self._value(key)
            self.cache[key] = v if self.graph else v.detach()
        return self.cache[key]
