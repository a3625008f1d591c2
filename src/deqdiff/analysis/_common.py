"""Plumbing shared by the analysis tools: locating a model's equilibrium layer, capturing its
input and output, swapping its output, and flat views of parameters.

Models follow the DEQ model protocol (docs: helpers' common brief): a ``deqdiff.DEQ`` reachable
as ``model.deq`` (or the model itself, or any sub-module that is a ``DEQ``), and
``model(x, **solver_overrides)`` passing overrides to the solve. Explicit weight-tied models
(repeat-k) have no DEQ; tools that need one say so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ..layers import DEQ

__all__ = ["find_deq", "require_deq", "capture_equilibrium", "replace_equilibrium", "Captured",
           "param_dict", "flatten_params", "no_deq_warnings", "standard_strides", "preserve_parameters"]


@contextlib.contextmanager
def preserve_parameters(model: nn.Module) -> Iterator[None]:
    """Put every sub-module's original ``nn.Parameter`` objects back on exit.

    ``torch.func.functional_call`` swaps parameters in and out; on a model that registers one
    module twice (e.g. ``model.cell`` and ``model.deq.cell``) the swap-back can leave plain
    tensors in place of the parameters, which then silently stop receiving gradients and
    vanish from ``model.parameters()``. Restoring the recorded objects prevents that."""
    saved = [(m, dict(m._parameters)) for m in model.modules()]
    try:
        yield
    finally:
        for m, params in saved:
            for name, p in params.items():
                m._parameters[name] = p


def standard_strides(x: Tensor) -> Tensor:
    """``x`` with row-major strides. Single-channel images sliced from an array may carry the
    strides ``(HW, 1, W, 1)``, which convolutions read as channels-last; group norm under
    ``vmap`` then fails ("querying is_contiguous inside of vmap"). ``contiguous()`` keeps such
    strides (both layouts count as contiguous when C = 1), a copy does not."""
    if x.stride() == torch.empty(x.shape).stride():
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def find_deq(model: nn.Module) -> DEQ | None:
    """The model's equilibrium layer: ``model`` itself, ``model.deq``, or its first ``DEQ``
    sub-module; ``None`` for explicit models."""
    if isinstance(model, DEQ):
        return model
    deq = getattr(model, "deq", None)
    if isinstance(deq, DEQ):
        return deq
    for m in model.modules():
        if isinstance(m, DEQ):
            return m
    return None


def require_deq(model: nn.Module, what: str) -> DEQ:
    deq = find_deq(model)
    if deq is None:
        raise TypeError(f"{what} needs a model with an equilibrium layer (a deqdiff.DEQ as model.deq); "
                        f"{type(model).__name__} has none")
    return deq


@dataclass
class Captured:
    """One forward pass: the model output, the DEQ's input (the injected x), its output z*
    and the solve statistics (``deqdiff.FixedPointInfo``)."""

    output: Tensor
    deq_input: Tensor
    z_star: Tensor
    info: object


def capture_equilibrium(model: nn.Module, x: Tensor, **overrides) -> Captured:
    """Run ``model(x, **overrides)`` and record what enters and leaves its DEQ."""
    deq = require_deq(model, "capture_equilibrium")
    seen: dict = {}

    def hook(module, args, kwargs, out):
        seen["input"] = args[0] if args else kwargs["x"]
        seen["z"] = out

    handle = deq.register_forward_hook(hook, with_kwargs=True)
    try:
        out = model(x, **overrides)
    finally:
        handle.remove()
    if "z" not in seen:
        raise RuntimeError(f"{type(model).__name__}.forward did not call its DEQ")
    return Captured(out, seen["input"], seen["z"], deq.last_info)


@contextlib.contextmanager
def replace_equilibrium(model: nn.Module, z: Tensor) -> Iterator[None]:
    """Within the block the model's DEQ returns ``z`` instead of solving: ``model(x)`` becomes
    ``post(z)`` (the part of the model after the equilibrium), as a function of z."""
    deq = require_deq(model, "replace_equilibrium")
    deq.forward = lambda *args, **kwargs: z  # instance attribute shadows the class method
    try:
        yield
    finally:
        del deq.forward


def param_dict(model: nn.Module, names=None, *, detach: bool = True) -> dict[str, Tensor]:
    """Trainable parameters by name (all with ``requires_grad`` when ``names`` is None)."""
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameters named {missing}; the model has {list(params)}")
    return {n: (params[n].detach() if detach else params[n]) for n in names}


def flatten_params(tree: Mapping[str, Tensor], batch_ndim: int = 0) -> Tensor:
    """Concatenate a dict of tensors to one flat vector (keeping ``batch_ndim`` leading dims)."""
    return torch.cat([v.reshape(*v.shape[:batch_ndim], -1) for v in tree.values()], dim=-1)


@contextlib.contextmanager
def no_deq_warnings() -> Iterator[list]:
    """Collect (instead of printing) the solver's ConvergenceWarnings; yields their list."""
    import warnings

    from ..solvers import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", ConvergenceWarning)
        got: list = []
        yield got
        got.extend(w for w in caught if issubclass(w.category, ConvergenceWarning))
