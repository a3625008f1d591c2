"""Input checks that turn silent misuse into errors naming the problem."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "check_fixed_point_inputs", "check_solve_options", "is_transformed"]

ON_FAIL = ("warn", "raise", "ignore")


def is_transformed(t: Tensor) -> bool:
    """True inside a ``torch.func`` transform (values are wrapped, data checks impossible)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def unwrapped(t: Tensor) -> tuple[Tensor | None, bool]:
    """The plain tensor under the ``torch.func`` wrappers that keep values and shape (``grad``,
    ``jvp``) — ``None`` under ``vmap``, whose batched tensors have another shape — and whether a
    wrapper level requires grad (a ``grad`` transform differentiates it there)."""
    fc = torch._C._functorch
    tracked = False
    while is_transformed(t):
        if fc.is_batchedtensor(t):
            return None, tracked
        tracked = tracked or t.requires_grad
        t = fc.get_unwrapped(t)
    return t, tracked


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of the floating-point ``tensors`` is finite: one min/max reduction
    per tensor (NaN propagates through it, ±∞ is its own extreme) and one test of those
    extremes, instead of an elementwise test and its temporaries per tensor (torch 2.13, CPU,
    80 000 floats: 34 µs against 440 µs for ``isfinite(t).all()``)."""
    ends = [torch.stack(torch.aminmax(t.detach())) for t in tensors if t.numel()]
    return not ends or bool(torch.isfinite(torch.cat(ends) if len(ends) > 1 else ends[0]).all())


def check_fixed_point_inputs(f: Callable, z0: Tensor, params: Sequence, batch_ndim: int) -> Tensor | None:
    """Validate ``fixed_point(f, z0, *params)``: types, dtype/device agreement, finiteness,
    the shape of ``f(z0, *params)`` and that ``f`` hides no tensor requiring grad. Returns
    that evaluation ``f(z0, *params)`` (detached; the forward solve's first one), or ``None``
    under ``torch.func`` transforms, where values cannot be checked."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must have a floating dtype, got {z0.dtype}")
    if not 0 <= batch_ndim <= z0.ndim:
        raise ValueError(f"batch_ndim={batch_ndim} is out of range for z0 of shape {tuple(z0.shape)}")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"params[{i}] is a {type(p).__name__}; every parameter passed to fixed_point must be a "
                "tensor (pass constants through a closure or functools.partial instead)"
            )
        if p.device != z0.device:
            raise ValueError(f"params[{i}] is on {p.device} but z0 is on {z0.device}")
        if p.is_floating_point() and p.dtype != z0.dtype:
            raise TypeError(f"params[{i}] has dtype {p.dtype} but z0 has dtype {z0.dtype}; cast them to one dtype")
    if is_transformed(z0) or any(is_transformed(p) for p in params):
        return None  # values are symbolic under vmap/grad transforms: checked at the outer call
    if not all_finite(z0):
        raise ValueError("z0 contains NaN or Inf")
    floats = [p for p in params if p.is_floating_point()]
    if floats and not all_finite(*floats):
        i = next(i for i, p in enumerate(params) if p.is_floating_point() and not all_finite(p))
        raise ValueError(f"params[{i}] (shape {tuple(params[i].shape)}) contains NaN or Inf")
    with torch.enable_grad():
        out = f(z0.detach(), *(p.detach() for p in params))
    if not isinstance(out, Tensor):
        raise TypeError(f"f must return a tensor, got {type(out).__name__}")
    if out.shape != z0.shape:
        raise ValueError(
            f"f(z0, *params) has shape {tuple(out.shape)} but z0 has shape {tuple(z0.shape)}: "
            "a fixed point needs f to map the state onto a state of the same shape"
        )
    if out.dtype != z0.dtype or out.device != z0.device:
        raise TypeError(
            f"f(z0, *params) returns {out.dtype} on {out.device}, z0 is {z0.dtype} on {z0.device}"
        )
    if out.requires_grad:
        raise ValueError(
            "f's output requires grad although z0 and every parameter were detached: f captures a "
            "tensor that requires grad from its closure. Pass such tensors explicitly as params "
            "(fixed_point(f, z0, *params)) so that derivatives with respect to them are correct"
        )
    if not all_finite(out):
        raise ValueError("f(z0, *params) contains NaN or Inf")
    return out


def check_row_params(row_params, z0: Tensor, params, batch_ndim: int) -> tuple[int, ...] | None:
    """Validate ``row_params``: integer indices of ``params`` whose dim 0 has z0's batch size."""
    if row_params is None:
        return None
    if batch_ndim != 1:
        raise ValueError(f"row_params needs batch_ndim=1, got batch_ndim={batch_ndim}")
    out = []
    for i in row_params:
        if not isinstance(i, int) or not -len(params) <= i < len(params):
            raise ValueError(f"row_params: {i!r} is not the index of one of the {len(params)} params")
        i %= len(params)
        p = params[i]
        if p.ndim == 0 or p.shape[0] != z0.shape[0]:
            raise ValueError(f"row_params: params[{i}] has shape {tuple(p.shape)}, but its dim 0 "
                             f"must index the {z0.shape[0]} rows of z0")
        out.append(i)
    return tuple(sorted(set(out)))


def check_solve_options(dtype: torch.dtype, *, tol, atol, max_iter, on_fail: str, prefix: str = "") -> None:
    """Refuse stopping options that cannot work: ``tol``/``atol`` finite and ≥ 0, ``max_iter``
    an integer ≥ 1, ``on_fail`` one of warn/raise/ignore. ``tol = atol = 0`` and a relative
    ``tol`` below the dtype's resolution ε (the residual of a computed f(z) − z is ~ε‖f(z)‖)
    cannot be met in general: refused, naming ε, unless ``on_fail="ignore"`` says that running
    ``max_iter`` iterations is the point (e.g. residual curves). ``prefix`` ("backward_")
    names the option as the caller spelled it."""
    for name, v in (("tol", tol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{prefix}{name} must be a finite number >= 0, got {v!r}")
    if on_fail not in ON_FAIL:
        raise ValueError(f"on_fail must be one of {ON_FAIL}, got {on_fail!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{prefix}max_iter must be an integer >= 1, got {max_iter!r}")
    if on_fail == "ignore":
        return
    if tol == 0 and atol == 0:
        raise ValueError(f"{prefix}tol and {prefix}atol are both 0: no residual can meet that; set {prefix}tol > 0 "
                         "(or on_fail='ignore' to run exactly max_iter iterations)")
    eps = torch.finfo(dtype).eps
    if 0 < tol < eps:
        raise ValueError(f"{prefix}tol={tol:g} is below the resolution of {dtype} (eps {eps:.3g}): a relative "
                         f"residual that small cannot be reached; use {prefix}tol >= {eps:.1g} or a wider dtype")
