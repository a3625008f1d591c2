"""Convolutional DEQ of Nguyen 2022 (eq. 4.1, §4.1) and its weight-tied explicit counterpart.

The cell is the residual block

    f(z, x) = norm(ReLU(z + norm(x + W₂ * norm(ReLU(W₁ * z)))))            (eq. 4.1)

with group norms and ``*`` a same-padded convolution. ``x`` is the injected input produced by a
convolutional stem; a classifier head (group norm, average pooling, linear) reads the state.

* :class:`ConvDEQ`: the state is the fixed point z* = f(z*, x), found by a ``deqdiff.DEQ``
  (so every derivative order is an implicit solve); ``model.deq`` holds the solve statistics.
* :class:`WeightTied` / :func:`repeat_k`: the same cell applied k times from z = 0 (Nguyen 2022, §4.2.1,
  "repeat-k"), differentiated by ordinary backpropagation.

Group norm everywhere (no batch norm) keeps every sample independent: the DEQ converges per sample,
and data-parallel training on shards equals training on the whole batch.
"""

from __future__ import annotations

from torch import Tensor, nn
import torch
import torch.nn.functional as F

from ..layers import DEQ

__all__ = ["ConvCell", "ConvStem", "ConvHead", "WeightTied", "ConvDEQ", "ConvRepeat", "repeat_k", "repeat_from_deq"]


class ConvCell(nn.Module):
    """The residual cell of eq. 4.1 on states of shape ``(B, channels, H, W)``.

    ``W₁``: channels → hidden, ``W₂``: hidden → channels, both k×k convolutions without bias,
    initialized N(0, ``init_std``²): the small initialization of Nguyen 2022, §4.1.1 (N(0, 0.01)
    gives std 0.1; Bai et al. use std 0.01) that keeps f contractive early in training."""

    def __init__(self, channels: int, hidden: int, *, kernel_size: int = 3, groups: int = 4, init_std: float = 0.01):
        super().__init__()
        for name, c in (("channels", channels), ("hidden", hidden)):
            if c % groups:
                raise ValueError(f"{name}={c} must be divisible by the number of groups ({groups})")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size, padding=pad, bias=False)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        nn.init.normal_(self.conv1.weight, 0.0, init_std)
        nn.init.normal_(self.conv2.weight, 0.0, init_std)
        self.channels = channels

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        out = self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))
        # under autocast the convolutions run in low precision; the state keeps its dtype
        return out.to(z.dtype)

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class ConvStem(nn.Module):
    """Images ``(B, C_in, H, W)`` → injected input ``x`` ``(B, channels, H, W)``: conv + group norm."""

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3, groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.conv(images))


class ConvHead(nn.Module):
    """State ``(B, channels, H, W)`` → logits: group norm, average pooling by ``pool``, linear."""

    def __init__(self, channels: int, image_size: tuple[int, int], num_classes: int, *, pool: int = 2, groups: int = 4):
        super().__init__()
        h, w = image_size
        if h % pool or w % pool:
            raise ValueError(f"image size {h}x{w} is not divisible by the pooling size {pool}")
        self.norm = nn.GroupNorm(groups, channels)
        self.pool = nn.AvgPool2d(pool)
        self.linear = nn.Linear(channels * (h // pool) * (w // pool), num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.pool(self.norm(z)).flatten(1))


class WeightTied(nn.Module):
    """Explicit weight-tied layer: ``z_{i+1} = cell(z_i, x)`` for i < k from ``z_0 = 0``.

    The explicit counterpart of ``deqdiff.DEQ(cell)`` (Nguyen 2022, §4.2.1, "repeat-k"); backpropagation
    runs through the k applications. ``forward(x, z0=None, store_trajectory=False)``; with
    ``store_trajectory`` the iterates ``z_0 … z_k`` are kept in ``last_trajectory``."""

    def __init__(self, cell: nn.Module, k: int):
        super().__init__()
        if int(k) != k or k < 1:
            raise ValueError(f"the number of repetitions k must be an integer >= 1, got {k}")
        self.cell, self.k = cell, int(k)
        self.last_trajectory: list[Tensor] | None = None

    def forward(self, x: Tensor, z0: Tensor | None = None, *, store_trajectory: bool = False) -> Tensor:
        z = self.cell.init_state(x) if z0 is None else z0
        traj = [z.detach()] if store_trajectory else None
        for _ in range(self.k):
            z = self.cell(z, x)
            if traj is not None:
                traj.append(z.detach())
        self.last_trajectory = traj
        return z


class _ConvNet(nn.Module):
    """Stem → core (DEQ or weight-tied cell) → head; the common body of both models."""

    def __init__(self, core: nn.Module, stem: ConvStem, head: ConvHead):
        super().__init__()
        self.stem, self.core, self.head = stem, core, head

    @property
    def cell(self) -> ConvCell:
        return self.core.cell

    def equilibrium(self, images: Tensor, **overrides) -> Tensor:
        """The state the head reads (z* for the DEQ, z_k for repeat-k)."""
        x = self.stem(images)
        # under autocast the stem may return bfloat16; the state has the parameters' dtype
        return self.core(x.to(self.head.linear.weight.dtype), **overrides)

    def forward(self, images: Tensor, **overrides) -> Tensor:
        return self.head(self.equilibrium(images, **overrides))


def _parts(in_channels, image_size, num_classes, channels, hidden, kernel_size, groups, pool, init_std):
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    stem = ConvStem(in_channels, channels, kernel_size=kernel_size, groups=groups)
    cell = ConvCell(channels, hidden, kernel_size=kernel_size, groups=groups, init_std=init_std)
    head = ConvHead(channels, tuple(image_size), num_classes, pool=pool, groups=groups)
    return stem, cell, head


class ConvDEQ(_ConvNet):
    """Classifier whose hidden state is the fixed point of eq. 4.1.

    ``solver_options`` go to ``deqdiff.DEQ`` (``solver``, ``tol``, ``max_iter``, ``m``,
    ``backward_solver``, ``on_fail`` …); the defaults are Nguyen 2022's §4.1.2 setting
    (Anderson, relative tolerance 1e-2, at most 50 iterations). ``model(x, **overrides)``
    passes overrides (``tol``, ``store_trajectory=True`` …) to the solve; ``model.deq.last_info``
    holds its statistics."""

    def __init__(
        self, in_channels: int = 1, image_size: int | tuple[int, int] = 8, num_classes: int = 10, *,
        channels: int = 16, hidden: int = 32, kernel_size: int = 3, groups: int = 4, pool: int = 2,
        init_std: float = 0.01, solver: str = "anderson", tol: float = 1e-2, max_iter: int = 50,
        **solver_options,
    ):
        stem, cell, head = _parts(in_channels, image_size, num_classes, channels, hidden, kernel_size, groups, pool, init_std)
        super().__init__(DEQ(cell, solver=solver, tol=tol, max_iter=max_iter, **solver_options), stem, head)

    @property
    def deq(self) -> DEQ:
        return self.core


class ConvRepeat(_ConvNet):
    """The explicit counterpart of :class:`ConvDEQ`: the same stem, cell and head, with the
    cell applied ``k`` times from z = 0 (repeat-k). It has no ``deq``."""

    def __init__(
        self, in_channels: int = 1, image_size: int | tuple[int, int] = 8, num_classes: int = 10, *,
        k: int = 6, channels: int = 16, hidden: int = 32, kernel_size: int = 3, groups: int = 4,
        pool: int = 2, init_std: float = 0.01,
    ):
        stem, cell, head = _parts(in_channels, image_size, num_classes, channels, hidden, kernel_size, groups, pool, init_std)
        super().__init__(WeightTied(cell, k), stem, head)

    @property
    def k(self) -> int:
        return self.core.k


def repeat_k(k: int, **kwargs) -> ConvRepeat:
    """``repeat_k(6, in_channels=1, ...)``: the repeat-6 network of Nguyen 2022, §4.2.1."""
    return ConvRepeat(k=k, **kwargs)


def repeat_from_deq(model: ConvDEQ, k: int) -> ConvRepeat:
    """A repeat-k network sharing (by reference) the stem, cell and head of a trained ConvDEQ:
    the DEQ's forward solve truncated to k plain iterations from z = 0."""
    net = ConvRepeat.__new__(ConvRepeat)
    _ConvNet.__init__(net, WeightTied(model.cell, k), model.stem, model.head)
    return net
