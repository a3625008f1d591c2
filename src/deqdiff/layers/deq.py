"""``DEQ``: an ``nn.Module`` whose output is the fixed point of a cell ``z = cell(z, x)``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..engine import FixedPointInfo, fixed_point

__all__ = ["DEQ"]


class DEQ(nn.Module):
    """Deep equilibrium layer ``x ↦ z*`` with ``z* = cell(z*, x)``.

    The cell's parameters and buffers are handed to the engine as explicit tensors
    (through ``torch.func.functional_call``), so derivatives of every order w.r.t. module
    parameters and inputs are implicit solves, and no tensor hides in a closure. The
    leading dimension of ``x`` and ``z`` is the batch: samples converge independently.

    ``z_init(x)`` gives the initial state (default: ``cell.init_state(x)`` if the cell
    defines it, else ``zeros_like(x)``). Other keyword arguments are ``fixed_point``
    options (``solver``, ``tol``, ``max_iter``, ``backward_solver``, ``on_fail``, …).
    """

    def __init__(self, cell: nn.Module, *, z_init: Callable[[Tensor], Tensor] | None = None, **solver_options):
        super().__init__()
        self.cell = cell
        self.z_init = z_init
        self.solver_options = solver_options
        self.last_info: FixedPointInfo | None = None

    def init_state(self, x: Tensor) -> Tensor:
        if self.z_init is not None:
            return self.z_init(x)
        if hasattr(self.cell, "init_state"):
            return self.cell.init_state(x)
        return torch.zeros_like(x)

    def forward(self, x: Tensor, z0: Tensor | None = None, **overrides) -> Tensor:
        names = [n for n, _ in self.cell.named_parameters()] + [n for n, _ in self.cell.named_buffers()]
        values = [p for _, p in self.cell.named_parameters()] + [b for _, b in self.cell.named_buffers()]
        cell = self.cell

        def f(z: Tensor, x: Tensor, *tensors: Tensor) -> Tensor:
            return functional_call(cell, dict(zip(names, tensors)), (z, x))

        z0 = self.init_state(x) if z0 is None else z0
        rows = {"row_params": (0,)} if x.ndim and x.shape[0] == z0.shape[0] else {}  # x is per-sample
        options = {**rows, **self.solver_options, **overrides, "batch_ndim": 1, "return_info": True}
        z, self.last_info = fixed_point(f, z0, x, *values, **options)
        return z
