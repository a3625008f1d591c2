"""The DEQ training tools as ``TrainConfig`` settings: backward mode, fixed-point correction, cell
normalization, ``torch.compile`` and mixed precision (checks, solver options, model changes).

* ``grad="exact"|"phantom"`` with ``phantom_steps``/``phantom_damping``: ``deqdiff.PhantomGrad``
  (Geng et al. 2021) handed to the DEQ as a solver option;
* ``correction=[k₁, …]`` (and ``correction_weights``): :mod:`deqdiff.training.correction`
  (Bai et al. 2022);
* ``cell_norm="weight"|"spectral"``: :func:`deqdiff.layers.apply_weight_norm` /
  :func:`deqdiff.layers.apply_spectral_norm` on the DEQ's cell;
* ``compile=True``: :func:`deqdiff.layers.compile_cell` on the DEQ's cell;
* ``amp="bf16"`` (any device) or ``"fp16"`` (CUDA, with a ``torch.amp.GradScaler``): autocast of
  the forward pass; inside the DEQ only the cell runs in low precision
  (:mod:`deqdiff.layers.precision`).
"""

from __future__ import annotations

import math
import numbers

from torch import nn

__all__ = ["check_tools", "tool_solver_options", "apply_cell_tools", "AMP_MODES", "CELL_NORMS"]

AMP_MODES = (None, "bf16", "fp16")
CELL_NORMS = ("none", "weight", "spectral")


def check_tools(config) -> None:
    """Raise ``ValueError`` naming the setting for a bad training-tool setting of ``config``."""
    from ..engine.phantom import BACKWARD_MODES, PhantomGrad
    from .correction import check_correction

    if config.grad not in BACKWARD_MODES:
        raise ValueError(f"grad must be one of {BACKWARD_MODES}, got {config.grad!r}")
    try:
        PhantomGrad(config.phantom_steps, config.phantom_damping)
    except ValueError as err:
        raise ValueError(str(err).replace("phantom steps", "phantom_steps").replace("phantom damping", "phantom_damping")) from None
    if config.correction is not None:
        try:
            its, ws = check_correction(config.correction, config.correction_weights)
        except ValueError as err:
            raise ValueError(f"correction: {err}") from None
        config.correction, config.correction_weights = its, ws
    elif config.correction_weights is not None:
        raise ValueError("correction_weights needs correction (the iterations they weigh)")
    if config.cell_norm not in CELL_NORMS:
        raise ValueError(f"cell_norm must be one of {CELL_NORMS}, got {config.cell_norm!r}")
    if not isinstance(config.compile, bool):
        raise ValueError(f"compile must be true or false, got {config.compile!r}")
    if config.amp == "fp16" and not str(config.device).startswith("cuda"):
        raise ValueError("amp 'fp16' needs a CUDA device (its loss scaling is for GPUs); use 'bf16' on the CPU")
    uses_deq = config.grad != "exact" or config.correction is not None or config.cell_norm != "none" or config.compile
    if uses_deq and config.model.startswith("repeat"):
        raise ValueError(f"grad/correction/cell_norm/compile act on a DEQ's cell; model {config.model!r} has no DEQ")
    for name in ("phantom_steps",):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not math.isfinite(float(config.phantom_damping)):
        raise ValueError(f"phantom_damping must be in (0, 1], got {config.phantom_damping!r}")


def tool_solver_options(config) -> dict:
    """DEQ options the tools add: the backward mode."""
    if config.grad == "phantom":
        from ..engine.phantom import PhantomGrad

        return {"grad": PhantomGrad(int(config.phantom_steps), float(config.phantom_damping))}
    return {}


def apply_cell_tools(model: nn.Module, config) -> nn.Module:
    """Normalize and/or compile ``model.deq.cell`` as ``config`` says (in place; returns ``model``)."""
    if config.cell_norm == "none" and not config.compile:
        return model
    deq = getattr(model, "deq", None)
    if deq is None:
        raise ValueError(f"cell_norm/compile need a DEQ model; {type(model).__name__} has no .deq")
    from ..layers import apply_spectral_norm, apply_weight_norm, compile_cell

    if config.cell_norm == "weight":
        apply_weight_norm(deq.cell)
    elif config.cell_norm == "spectral":
        apply_spectral_norm(deq.cell)
    if config.compile:
        compile_cell(deq.cell)
    return model
