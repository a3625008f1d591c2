"""``DEQ``: an ``nn.Module`` whose output is the fixed point of a cell ``z = cell(z, x)``."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..engine import FixedPointInfo, fixed_point
from .dropout import dropout_modules, reset_dropout_masks
from .normalization import update_spectral_norms
from .precision import LOW_PRECISION_BACKWARD_SOLVER, CellPrecision

__all__ = ["DEQ"]


class DEQ(nn.Module):
    """Deep equilibrium layer ``x ↦ z*`` with ``z* = cell(z*, x)``.

    The cell's parameters and buffers are handed to the engine as explicit tensors
    (through ``torch.func.functional_call``), so derivatives of every order w.r.t. module
    parameters and inputs are implicit solves, and no tensor hides in a closure. The
    leading dimension of ``x`` and ``z`` is the batch: samples converge independently.

    The initial state, first that applies: ``forward(x, z0=...)``; ``z_init(x)``; zeros of
    shape ``(batch, *state_shape)`` when ``state_shape`` (the per-sample state shape, an int or
    a tuple) is given; ``cell.init_state(x)`` if the cell defines it; else ``zeros_like(x)``,
    which fits only a cell whose state has the input's shape — that default is checked once
    per input shape, and a cell that fails on it or returns another shape raises an error
    naming ``state_shape``. Other keyword arguments are ``fixed_point`` options (``solver``,
    ``tol``, ``max_iter``, ``backward_solver``, ``on_fail``, ``grad``, …).

    Per-solve state: before each forward solve, ``forward`` advances the power iteration of every
    ``SpectralNorm`` in the cell (training mode) and draws new ``VariationalDropout`` masks, so
    that every evaluation of the cell within the solve and its derivative solves sees one map.
    ``forward(x, refresh=False)`` keeps the previous solve's masks and estimates (to re-enter the
    same map, e.g. for fixed-point correction).

    Under ``torch.autocast`` only the cell runs in low precision; the solver's state (float32 at
    least), stopping rule and linear algebra do not (:mod:`deqdiff.layers.precision`).
    """

    def __init__(self, cell: nn.Module, *, z_init: Callable[[Tensor], Tensor] | None = None,
                 state_shape: int | Sequence[int] | None = None, **solver_options):
        super().__init__()
        self.cell = cell
        self.z_init = z_init
        if state_shape is not None:
            state_shape = (state_shape,) if isinstance(state_shape, int) else tuple(state_shape)
            if not all(isinstance(n, int) and n >= 1 for n in state_shape):
                raise ValueError(f"state_shape must be positive integers (the per-sample state shape), got {state_shape}")
        self.state_shape: tuple[int, ...] | None = state_shape
        self.solver_options = solver_options
        self.last_info: FixedPointInfo | None = None
        self._default_checked: set[tuple] = set()  # input shapes on which zeros_like(x) was a valid state

    def init_state(self, x: Tensor) -> Tensor:
        if self.z_init is not None:
            return self.z_init(x)
        if self.state_shape is not None:
            return x.new_zeros(x.shape[0], *self.state_shape)
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state(x)
        z0 = torch.zeros_like(x)
        self._check_default_state(z0, x)
        return z0

    def _check_default_state(self, z0: Tensor, x: Tensor) -> None:
        """The fallback start ``zeros_like(x)`` assumes the state has the input's shape: evaluate
        the cell on it once per input shape and say what to pass when it does not fit."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key in self._default_checked:
            return
        fix = ("the default initial state is zeros_like(x); pass DEQ(cell, state_shape=<per-sample state "
               "shape>), z_init=, forward(x, z0=...), or give the cell an init_state(x)")
        try:
            with torch.no_grad():
                out = self.cell(z0, x)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"DEQ: the cell fails on the state zeros_like(x) of shape {tuple(z0.shape)} "
                             f"({first}); {fix}") from e
        if not isinstance(out, Tensor) or out.shape != z0.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            hint = f" (state_shape={tuple(out.shape[1:])}?)" if isinstance(out, Tensor) and out.ndim else ""
            raise ValueError(f"DEQ: the cell maps the state zeros_like(x) of shape {tuple(z0.shape)} to {got}{hint}; {fix}")
        self._default_checked.add(key)

    def forward(self, x: Tensor, z0: Tensor | None = None, *, refresh: bool = True, **overrides) -> Tensor:
        z0 = self.init_state(x) if z0 is None else z0
        if refresh:  # per-solve state: one spectral-norm power step and one dropout mask per solve
            update_spectral_norms(self.cell)
        if refresh and reset_dropout_masks(self.cell):
            # one variational-dropout mask per solve: draw it now (one cell call) so that it is a
            # buffer the engine receives as an explicit tensor, not a random draw inside f
            with torch.no_grad():
                self.cell(z0.detach(), x.detach())
        names = [n for n, _ in self.cell.named_parameters()] + [n for n, _ in self.cell.named_buffers()]
        values = [p for _, p in self.cell.named_parameters()] + [b for _, b in self.cell.named_buffers()]
        cell = self.cell
        # untying (functional_call's default) matters only where one tensor has several names;
        # it costs about a third of a small cell's evaluation, and f runs dozens of times a step
        tied = len(names) != sum(1 for _ in cell.named_parameters(remove_duplicate=False)) + sum(
            1 for _ in cell.named_buffers(remove_duplicate=False))

        in_call = [True]  # the cell holds `values` only until this call returns (a later call may
        # draw new dropout masks, functional_call may have swapped tensors in for this one)

        def f(z: Tensor, x: Tensor, *tensors: Tensor) -> Tensor:
            if in_call[0] and len(tensors) == len(values) and all(t is v for t, v in zip(tensors, values)):
                return cell(z, x)  # the cell's own tensors (forward iterations): nothing to swap in
            return functional_call(cell, dict(zip(names, tensors)), (z, x), tie_weights=tied)

        rows = {"row_params": (0,)} if x.ndim and x.shape[0] == z0.shape[0] else {}  # x is per-sample
        masks = {id(m.mask) for m in dropout_modules(cell) if m.mask is not None and 0 not in m.shared_dims}
        if rows and masks:  # per-sample dropout masks follow the rows still running, like x
            rows["row_params"] += tuple(1 + i for i, v in enumerate(values) if id(v) in masks)
        options = {**rows, **self.solver_options, **overrides, "batch_ndim": 1, "return_info": True}
        precision = CellPrecision.capture(x.device.type)  # under autocast: the cell low, the solver not
        if precision.active and z0.dtype in (torch.float16, torch.bfloat16):
            z0 = z0.float()
        if precision.active and options.get("backward_solver", "auto") == "auto":
            options["backward_solver"] = LOW_PRECISION_BACKWARD_SOLVER
        try:
            with precision.solver_context():
                z, self.last_info = fixed_point(precision.wrap(f), z0, x, *values, **options)
        finally:
            in_call[0] = False
        return z
