"""Mixed precision for DEQs: the cell in low precision, the solver in the state's precision.

Under ``torch.autocast`` a naive DEQ would run everything in the autocast context: the solver's
own arithmetic too (Anderson's Gram products ``ΔFᵀΔF`` are matrix products, which autocast runs in
bfloat16/float16), so the least-squares mixing weights and the stopping rule would see 3 significant
digits. ``deqdiff.DEQ`` instead splits the precision (as mixed-precision training does for
weights vs. activations, Micikevicius et al. 2018, "Mixed precision training"):

============================================  ==========================================
part                                          precision under ``autocast(dtype=low)``
============================================  ==========================================
cell evaluations ``f(z, x)`` (forward solve,   ``low`` for the ops autocast lowers
derivative solves' vector–Jacobian products,   (convolutions, matmuls); autocast's float32
phantom steps)                                 list (norms, softmax, …) in float32
cell output, solver state z, iterates,        the state's dtype (float32): the cell's
residuals, stopping rule, Anderson/Broyden     output is cast back to ``z.dtype``
linear algebra
implicit linear solves (adjoints, tangents)   the state's dtype
parameters and their gradients                their own dtype (float32)
============================================  ==========================================

Derivative solves under autocast default to GMRES (``backward_solver="auto"`` becomes
``"gmres"``): the dense path of "auto" builds ``I − J`` by ``vmap`` over vector–Jacobian products,
and PyTorch 2.13 fails there ("Expected scalar types of X and dY are same") when a group norm
receives a bfloat16 input with float32 affine parameters — what CPU autocast produces — and grad
mode is off, as in a first-order backward. An explicit ``backward_solver`` is kept.

The autocast state is captured when ``DEQ.forward`` is called and re-applied inside the cell
wherever the engine evaluates it later — including derivative solves that autograd runs after the
``autocast`` block has been left — so the forward and derivative solves see one map.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CellPrecision", "LOW_PRECISION_BACKWARD_SOLVER"]

#: the derivative solver that replaces "auto" under autocast (module docstring)
LOW_PRECISION_BACKWARD_SOLVER = "gmres"


@dataclass(frozen=True)
class CellPrecision:
    """The autocast setting of the cell (``dtype`` None: autocast off) on ``device_type``."""

    device_type: str
    dtype: torch.dtype | None

    @classmethod
    def capture(cls, device_type: str) -> "CellPrecision":
        """The autocast state now (inside or outside an ``autocast`` block)."""
        if torch.is_autocast_enabled(device_type):
            return cls(device_type, torch.get_autocast_dtype(device_type))
        return cls(device_type, None)

    @property
    def active(self) -> bool:
        return self.dtype is not None

    def wrap(self, f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``f`` evaluated under this autocast setting, its output in the state's dtype."""
        if not self.active:
            return f
        device_type, dtype = self.device_type, self.dtype

        def cell(z: Tensor, *params: Tensor) -> Tensor:
            with torch.autocast(device_type, dtype=dtype):
                out = f(z, *params)
            return out.to(z.dtype)

        return cell

    def solver_context(self) -> AbstractContextManager:
        """Where the engine runs: autocast off (the solver's arithmetic in the state's dtype)."""
        return torch.autocast(self.device_type, enabled=False) if self.active else nullcontext()
