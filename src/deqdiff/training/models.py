"""``build_model(config, image_shape, num_classes)``: the networks ``deqdiff train`` knows.

* ``conv``      — :class:`deqdiff.models.conv.ConvDEQ` (Nguyen 2022, eq. 4.1);
* ``repeat-K``  — :class:`deqdiff.models.conv.ConvRepeat`, the same cell applied K times;
* ``mon``       — fully connected monotone DEQ (``deqdiff.models.monotone.MonotoneDEQ``) on
  flattened images (``width`` state units);
* ``mon-conv``  — convolutional monotone DEQ (``deqdiff.models.monotone_conv.MonotoneConvDEQ``,
  ``width`` channels);
* ``mdeq``      — multiscale DEQ (``deqdiff.models.mdeq.MDEQ``): ``branches`` resolutions with
  ``channels``·2^i state and ``hidden``·2^i inner channels in branch i.

The monotone models are imported only when asked for.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .config import TrainConfig
from .tools import apply_cell_tools, tool_solver_options

__all__ = ["build_model", "model_kind", "count_parameters"]


def model_kind(name: str) -> tuple[str, int | None]:
    """``"repeat-6"`` → ``("repeat", 6)``; other names → ``(name, None)``."""
    m = re.fullmatch(r"repeat-(\d+)", name)
    if m:
        return "repeat", int(m.group(1))
    if name in ("conv", "mon", "mon-conv", "mdeq"):
        return name, None
    raise ValueError(f"unknown model {name!r}; choose conv, repeat-K (e.g. repeat-6), mon, mon-conv or mdeq")


def _solver_options(config: TrainConfig) -> dict:
    opts = dict(on_fail="ignore")
    for key in ("solver", "tol", "max_iter"):
        if getattr(config, key) is not None:
            opts[key] = getattr(config, key)
    if config.backward_tol is not None:
        opts["backward_tol"] = config.backward_tol
    if config.backward_max_iter is not None:
        opts["backward_max_iter"] = config.backward_max_iter
    opts.update(tool_solver_options(config))  # backward mode (exact / phantom)
    return opts


def _monotone(name: str):
    """The monotone model classes (imported only when asked for)."""
    try:
        from ..models.monotone import MonotoneDEQ
        from ..models.monotone_conv import MonotoneConvDEQ
    except ImportError as err:
        raise ImportError(f"model {name!r} needs deqdiff.models.monotone, which is not available: {err}") from err
    return MonotoneDEQ, MonotoneConvDEQ


def build_model(config: TrainConfig, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by ``config.model`` for images ``(C, H, W)``, on ``config.device`` with
    ``config.dtype``. The DEQ solves ignore non-convergence (``on_fail="ignore"``) because
    training records and reports every solve's residual and converged fraction instead."""
    kind, k = model_kind(config.model)
    # initialize in float32 whatever the process default is, so a seed gives the same network
    # in every process (e.g. a test session with float64 default and its spawned workers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = apply_cell_tools(_build(config, kind, k, image_shape, num_classes), config)  # norm, compile
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=config.device, dtype=getattr(torch, config.dtype))


def _build(config: TrainConfig, kind: str, k: int | None, image_shape, num_classes: int) -> nn.Module:
    c, h, w = image_shape
    if kind in ("conv", "repeat"):
        from ..models.conv import ConvDEQ, ConvRepeat

        common = dict(
            in_channels=c, image_size=(h, w), num_classes=num_classes, channels=config.channels,
            hidden=config.hidden, groups=config.groups, pool=config.pool, init_std=config.init_std,
        )
        model = ConvDEQ(**common, **_solver_options(config)) if kind == "conv" else ConvRepeat(k=k, **common)
    elif kind == "mdeq":
        from ..models.mdeq import MDEQ

        large = min(h, w) >= 32  # CIFAR-10: the paper's 4 branches and average-pooling head
        n = config.branches if config.branches is not None else (4 if large else 2)
        model = MDEQ(c, num_classes, channels=[config.channels << i for i in range(n)],
                     hidden=[config.hidden << i for i in range(n)], groups=config.groups, dropout=config.dropout,
                     init_std=config.init_std, pool="avg" if large else "flatten", image_size=(h, w),
                     **_solver_options(config))
    else:
        MonotoneDEQ, MonotoneConvDEQ = _monotone(config.model)
        opts = _solver_options(config)
        if config.mon_m is not None:
            opts["m"] = config.mon_m
        if config.mon_alpha is not None:
            opts["alpha"] = config.mon_alpha
        if kind == "mon":  # flattens the images itself
            model = MonotoneDEQ(c * h * w, config.width, num_classes, **opts)
        else:
            model = MonotoneConvDEQ(c, config.width, (h, w), num_classes, pool=config.pool, **opts)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
