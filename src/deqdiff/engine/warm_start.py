"""Warm starts across calls: the previous call's solutions as the next call's starting points.

An implicit derivative depends on z* and on the tolerances only, never on where a solve
started, so when a training loop solves the same samples again (fixed collocation points,
the same batch) the forward solve can start from the previous z* and every derivative solve
(tangents, adjoints, their transposes) from the previous solution of the same solve — the
gradient is unchanged to tolerance. Unrolled autodiff cannot do this: its gradient is the
derivative of the iterations it ran.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["WarmStart"]


class WarmStart:
    """Holds the last z* of one fixed point and the solutions of its derivative solves.

    Pass the same object to ``fixed_point(..., warm_start=ws)`` (or ``DEQ(cell,
    warm_start=ws)``) at every step. The k-th derivative solve of a call starts from the
    k-th solution of the previous call when its shape, dtype, device and orientation (A or
    Aᵀ) match; anything else starts cold, so a changed batch or pattern only costs
    iterations. The batch structure that ``fixed_point`` finds by probing ``f`` (which dims
    are samples, which params are per sample) is kept too, and probed again only when ``f``
    or a shape or dtype changes. ``reset()`` forgets everything (e.g. when the samples
    change). ``extrapolate=False`` starts from the last solutions themselves. Richardson and
    Anderson linear solves scale a given start per row to the least residual
    (:func:`deqdiff.solvers.linear.scaled_start`): the right-hand sides of derivative solves
    behind a loss on derivatives change scale and sign with the per-sample loss residuals. Memory: two
    states per stored solve (one without ``extrapolate``), detached."""

    def __init__(self, extrapolate: bool = True) -> None:
        self.extrapolate = bool(extrapolate)
        self.z: Tensor | None = None
        self._z_prev: Tensor | None = None
        self.solutions: dict[tuple, Tensor] = {}
        self._previous: dict[tuple, Tensor] = {}
        self.cold_iterations: int | None = None  # forward iterations of the first (cold) solve
        self._structure: tuple | None = None  # (key, (batch_ndim, row_params))

    def reset(self) -> None:
        self.z, self._z_prev, self.solutions, self._previous = None, None, {}, {}
        self.cold_iterations, self._structure = None, None

    def structure(self, key: tuple, probe: Callable[[], tuple]) -> tuple:
        """``probe()`` (the batch structure of ``f``), computed once per ``key`` (``f``, the
        shapes, dtypes and device of ``z0`` and the params)."""
        if self._structure is None or self._structure[0] != key:
            self._structure = (key, probe())
        return self._structure[1]

    def _start(self, last: Tensor | None, before: Tensor | None, like: Tensor) -> Tensor | None:
        """The next start: ``last``, or ``2·last − before`` (linear extrapolation along the
        optimizer's path: consecutive steps move the solution alike, so the start error drops
        from first to second order in the step) when both fit ``like``."""
        if last is None or last.shape != like.shape or last.dtype != like.dtype or last.device != like.device:
            return None
        if self.extrapolate and before is not None and before.shape == last.shape:
            return 2 * last - before
        return last

    def initial_state(self, z0: Tensor) -> Tensor:
        """``z0``, or the start predicted from the previous z* (two, when ``extrapolate``)
        when it fits ``z0``'s shape, dtype and device."""
        z = self._start(self.z, self._z_prev, z0)
        return z0 if z is None else z

    def store_forward(self, z: Tensor, iterations: int) -> None:
        if self.z is not None and self.z.shape == z.shape:
            self._z_prev = self.z
        else:
            self._z_prev = None
        self.z = z.detach()
        if self.cold_iterations is None:
            self.cold_iterations = iterations

    def call(self) -> "_WarmCall":
        """The per-call view that numbers this call's derivative solves."""
        return _WarmCall(self)


class _WarmCall:
    def __init__(self, owner: WarmStart):
        self.owner, self.count = owner, 0

    def key(self, transposed: bool, rows: Tensor) -> tuple:
        self.count += 1
        return (self.count, transposed, tuple(rows.shape), rows.dtype, rows.device)

    def start(self, key: tuple) -> Tensor | None:
        last = self.owner.solutions.get(key)
        if last is None:
            return None
        return self.owner._start(last, self.owner._previous.get(key), last)

    def store(self, key: tuple, x: Tensor) -> None:
        last = self.owner.solutions.get(key)
        if last is not None and last.shape == x.shape:
            self.owner._previous[key] = last
        else:
            self.owner._previous.pop(key, None)
        self.owner.solutions[key] = x.detach()
