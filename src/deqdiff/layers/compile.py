"""``torch.compile`` for DEQ cells, with every derivative still exact.

A DEQ spends most of its time evaluating its cell: tens of times in the forward solve, and once
per iteration of each derivative solve (vector–Jacobian products). ``torch.compile`` cannot
differentiate twice through a compiled region (AOTAutograd: "torch.compile with aot_autograd does
not currently support double backward", verified with torch 2.13), and deqdiff's promise is
derivatives of every order. :func:`compile_cell` therefore compiles the cell for the evaluations
that are never differentiated — those made without a graph (the forward solve runs under
``no_grad`` on detached parameters; evaluation) — and runs the eager cell wherever autograd,
forward-mode AD or a ``torch.func`` transform is recording. Derivatives are thus computed on the
eager graph at the z* the compiled forward solve found: first, second and higher derivatives are
those of the eager DEQ up to the rounding difference between compiled and eager kernels in z*.

The solver's own steps are not compiled: their data-dependent stopping and row compaction would
cost recompilations, and the cell dominates their cost (measured in
``benchmarks/bench_training_tools.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["compile_cell", "is_compiled_cell"]


def _recording(args) -> bool:
    """Whether any derivative could be taken of a call with these arguments."""
    if torch.is_grad_enabled():
        return True
    from torch._C._functorch import is_functorch_wrapped_tensor
    import torch.autograd.forward_ad as fwAD

    tensors = [a for a in args if isinstance(a, Tensor)]
    return any(is_functorch_wrapped_tensor(t) or fwAD.unpack_dual(t).tangent is not None for t in tensors)


def compile_cell(cell: nn.Module, **compile_options) -> nn.Module:
    """Make ``cell`` (in place; returned) use ``torch.compile(type(cell).forward, **compile_options)``
    for calls that record no derivative, and its eager ``forward`` otherwise.

    Parameter names, ``state_dict`` and ``isinstance`` are unchanged (the cell's class becomes a
    subclass, as ``torch.nn.utils.parametrize`` does), so checkpoints are interchangeable between
    compiled and eager runs. ``compile_options`` go to ``torch.compile`` (``backend``, ``mode``,
    ``dynamic`` …). Compilation happens at the first call (seconds to minutes on a CPU).
    Raises ``TypeError`` if ``cell`` is not an ``nn.Module`` and ``ValueError`` if it is
    compiled already."""
    if not isinstance(cell, nn.Module):
        raise TypeError(f"compile_cell needs an nn.Module, got {type(cell).__name__}")
    if is_compiled_cell(cell):
        raise ValueError(f"{type(cell).__name__} is compiled already")
    base = type(cell)
    compiled = torch.compile(base.forward, **compile_options)

    def forward(self, *args, **kwargs):
        if _recording(args) or any(_recording((v,)) for v in kwargs.values()):
            return base.forward(self, *args, **kwargs)
        return compiled(self, *args, **kwargs)

    cls = type(f"Compiled{base.__name__}", (base,), {"forward": forward, "_deqdiff_compiled_base": base})
    cell.__class__ = cls
    return cell


def is_compiled_cell(cell: nn.Module) -> bool:
    return hasattr(type(cell), "_deqdiff_compiled_base")
