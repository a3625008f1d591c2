"""Multiscale deep equilibrium model (MDEQ; Bai, Koltun & Kolter 2020, "Multiscale deep
equilibrium models", NeurIPS, §3 and Fig. 2).

The state is a tuple of feature maps at n = 2–4 resolutions, branch i of shape
``(C_i, H/2^i, W/2^i)``. One application of the cell ``f(z, x)``:

1. **per-branch residual block** (their ``BasicBlock``, §3.2)::

       y_i = ReLU(GN₃(z_i + GN₂(drop(W₂ * ReLU(GN₁(W₁ * z_i))) + x_i)))

   with input injection ``x_0 = x`` (the stem's output) into the highest-resolution branch only
   and ``x_i = 0`` for the others, as in the paper (§3.2: "the input is injected only at the
   highest resolution"); ``drop`` is :class:`deqdiff.layers.VariationalDropout` (one mask per
   sample and channel per forward solve);
2. **multi-resolution fusion** (§3.2): ``u_i = Σ_j F_ij(y_j)`` with ``F_ii`` the identity,
   ``F_ij`` (j > i, coarser to finer) a 1×1 convolution + group norm followed by nearest
   upsampling by 2^(j−i), and ``F_ij`` (j < i, finer to coarser) i − j strided 3×3 convolutions
   (group norm each, ReLU between them);
3. **post-fusion** per branch: ``f_i = GN(W_i * ReLU(u_i))`` with a 1×1 convolution ``W_i``.

Every convolution of the cell is weight-normalized, ``w = g · v/‖v‖`` per output filter
(Salimans & Kingma 2016), written out in :class:`WeightNormConv2d` rather than with
``torch.nn.utils.parametrizations.weight_norm``: that parametrization calls
``torch._weight_norm``, whose second derivative with respect to ``v`` is wrong in torch 2.13
on CPU (gradgradcheck fails), and every derivative order of a DEQ goes through it.

For the solvers the branches are flattened into one vector per sample, ``(B, Σ_i C_i H_i W_i)``;
the cell reads the branches as views of that vector (no copy) and concatenates its outputs
once. :meth:`MDEQCell.branches` turns a state back into the branch tensors.

Group norm everywhere (no batch norm) keeps samples independent: the DEQ converges per sample,
and data-parallel training equals training on the whole batch.

Classification head (simpler than the paper's HRNet-style head, stated): per branch a 1×1
convolution + group norm + ReLU, then from the finest branch down a strided 3×3 convolution
(+ group norm + ReLU) added to the next branch's features, a final 1×1 convolution to
``final_channels`` + group norm + ReLU, then global average pooling (``pool="avg"``, the
paper's) or flattening of the coarsest map (``pool="flatten"``, default for the 8×8 digits,
whose 4×4 coarsest map still carries the layout of the digit), and a linear layer. The paper
uses bottleneck blocks per branch and batch norm; we use single convolutions and group norm.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from ..layers.dropout import VariationalDropout

__all__ = ["WeightNormConv2d", "MDEQBlock", "MDEQFusion", "MDEQCell", "MDEQStem", "MDEQHead", "MDEQ",
           "mdeq_digits", "mdeq_cifar10", "CONFIGS"]


class WeightNormConv2d(nn.Module):
    """2-D convolution with weight ``w = g · v/‖v‖`` per output filter (Salimans & Kingma 2016,
    "Weight normalization", eq. 2).

    Parameters ``weight_v`` ``(out, in, k, k)`` (direction) and ``weight_g`` ``(out,)`` (the
    filter norms, initialized to ‖v‖ so that w = v at initialization; v ~ N(0, ``init_std``²)).
    Input ``(B, in, H, W)`` → output ``(B, out, H', W')`` as ``torch.nn.Conv2d``. The gains are
    1-D, so the filter-normalized landscapes treat them like norm scales (Li et al. 2018).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = False, init_std: float = 0.01):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight_v = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * init_std)
        self.weight_g = nn.Parameter(self.weight_v.detach().flatten(1).norm(dim=1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def weight(self) -> Tensor:
        v = self.weight_v
        scale = self.weight_g / torch.linalg.vector_norm(v.flatten(1), dim=1)
        return v * scale[:, None, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class MDEQBlock(nn.Module):
    """Residual block of one branch (module docstring, step 1) on ``(B, channels, h, w)``:
    ``W₁``: channels → hidden (3×3), ``W₂``: hidden → channels (3×3), group norms of ``groups``."""

    def __init__(self, channels: int, hidden: int, *, groups: int, dropout: float = 0.0, init_std: float = 0.01):
        super().__init__()
        self.conv1 = WeightNormConv2d(channels, hidden, 3, padding=1, init_std=init_std)
        self.conv2 = WeightNormConv2d(hidden, channels, 3, padding=1, init_std=init_std)
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        # one mask entry per sample and channel, as in the MDEQ reference code
        self.drop = VariationalDropout(dropout, shared_dims=(2, 3))

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        y = self.drop(self.conv2(F.relu(self.norm1(self.conv1(z)))))
        if injection is not None:
            y = y + injection
        return F.relu(self.norm3(z + self.norm2(y)))


def _check_groups(what: str, channels: Sequence[int], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{what} {list(channels)}: every width must be divisible by the number of groups ({groups})")


class MDEQFusion(nn.Module):
    """Multi-resolution fusion and post-fusion (module docstring, steps 2–3): branch tensors
    ``[(B, C_j, H/2^j, W/2^j)]`` → the same shapes."""

    def __init__(self, channels: Sequence[int], *, groups: int, init_std: float = 0.01):
        super().__init__()
        n = len(channels)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # coarser → finer: 1×1 conv, group norm; upsampled in forward
                    row.append(nn.Sequential(WeightNormConv2d(channels[j], channels[i], 1, init_std=init_std),
                                             nn.GroupNorm(groups, channels[i])))
                else:  # finer → coarser: i − j strided 3×3 convs
                    steps: list[nn.Module] = []
                    for s in range(i - j):
                        last = s == i - j - 1
                        out = channels[i] if last else channels[j]
                        steps += [WeightNormConv2d(channels[j], out, 3, stride=2, padding=1, init_std=init_std),
                                  nn.GroupNorm(groups, out)]
                        if not last:
                            steps.append(nn.ReLU())
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.post = nn.ModuleList(
            nn.Sequential(nn.ReLU(), WeightNormConv2d(c, c, 1, init_std=init_std), nn.GroupNorm(groups, c))
            for c in channels)

    def forward(self, ys: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, row in enumerate(self.fuse):
            u = ys[i]
            for j, op in enumerate(row):
                if j == i:
                    continue
                v = op(ys[j])
                if j > i:
                    v = F.interpolate(v, scale_factor=2 ** (j - i), mode="nearest")
                u = u + v
            out.append(self.post[i](u))
        return out


class MDEQCell(nn.Module):
    """The MDEQ cell ``f(z, x)`` on flat states ``z`` ``(B, N)``, N = Σ_i C_i (H/2^i)(W/2^i),
    and injected inputs ``x`` ``(B, C_0, H, W)``; returns ``(B, N)`` in z's dtype.

    ``channels``: branch widths C_i (2–4 branches, finest first); ``hidden``: widths of each
    block's inner convolution (default 2·C_i); ``dropout``: variational dropout probability of
    the blocks (0 disables it). Raises ``ValueError`` for a branch count outside 2–4, widths not
    divisible by ``groups``, or (at call time) H, W not divisible by 2^(n−1).
    """

    def __init__(self, channels: Sequence[int], hidden: Sequence[int] | None = None, *, groups: int = 4,
                 dropout: float = 0.0, init_std: float = 0.01):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not 2 <= len(channels) <= 4:
            raise ValueError(f"an MDEQ has 2 to 4 resolution branches, got {len(channels)} (channels={list(channels)})")
        hidden = tuple(2 * c for c in channels) if hidden is None else tuple(int(h) for h in hidden)
        if len(hidden) != len(channels):
            raise ValueError(f"hidden {list(hidden)} must have one width per branch ({len(channels)})")
        _check_groups("channels", channels, groups)
        _check_groups("hidden", hidden, groups)
        self.channels, self.hidden = channels, hidden
        self.blocks = nn.ModuleList(MDEQBlock(c, h, groups=groups, dropout=dropout, init_std=init_std)
                                    for c, h in zip(channels, hidden))
        self.fusion = MDEQFusion(channels, groups=groups, init_std=init_std)

    def branch_shapes(self, x: Tensor) -> list[tuple[int, int, int]]:
        """Per-sample shapes ``(C_i, H/2^i, W/2^i)`` of the branches for injected inputs ``x``."""
        h, w = x.shape[-2:]
        n = len(self.channels)
        if h % 2 ** (n - 1) or w % 2 ** (n - 1):
            raise ValueError(f"an MDEQ with {n} branches needs image sides divisible by {2 ** (n - 1)}, got {h}x{w}")
        return [(c, h >> i, w >> i) for i, c in enumerate(self.channels)]

    def state_size(self, x: Tensor) -> int:
        return sum(math.prod(s) for s in self.branch_shapes(x))

    def branches(self, z: Tensor, x: Tensor) -> list[Tensor]:
        """The branch tensors ``(B, C_i, H_i, W_i)`` of a flat state ``z`` ``(B, N)`` (views)."""
        shapes = self.branch_shapes(x)
        parts = z.split([math.prod(s) for s in shapes], dim=-1)
        return [p.view(*z.shape[:-1], *s) for p, s in zip(parts, shapes)]

    @staticmethod
    def flatten(branches: Sequence[Tensor]) -> Tensor:
        """Branch tensors ``[(B, C_i, H_i, W_i)]`` → flat state ``(B, N)`` (one concatenation)."""
        return torch.cat([b.flatten(1) for b in branches], dim=1)

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.state_size(x))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        zs = self.branches(z, x)
        ys = [block(zi, x if i == 0 else None) for i, (block, zi) in enumerate(zip(self.blocks, zs))]
        # under autocast the convolutions run in low precision; the state keeps its dtype
        return self.flatten(self.fusion(ys)).to(z.dtype)


class MDEQStem(nn.Module):
    """Images ``(B, C_in, H, W)`` → injected input ``(B, channels, H, W)``: 3×3 conv, group norm,
    ReLU (the paper's stem, without its downsampling, as for their CIFAR-10 models)."""

    def __init__(self, in_channels: int, channels: int, *, groups: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, images: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(images)))


class MDEQHead(nn.Module):
    """Branch tensors → logits ``(B, num_classes)`` (module docstring, "Classification head")."""

    def __init__(self, channels: Sequence[int], num_classes: int, *, head_channels: Sequence[int] | None = None,
                 final_channels: int | None = None, groups: int = 4, pool: str = "avg",
                 coarsest: tuple[int, int] | None = None):
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        if pool == "flatten" and coarsest is None:
            raise ValueError("pool='flatten' needs the coarsest branch's size (coarsest=(h, w))")
        self.pool = pool
        head = tuple(channels) if head_channels is None else tuple(head_channels)
        if len(head) != len(channels):
            raise ValueError(f"head_channels {list(head)} must have one width per branch ({len(channels)})")
        final = 4 * head[-1] if final_channels is None else int(final_channels)
        _check_groups("head_channels", head, groups)
        _check_groups("final_channels", (final,), groups)

        def conv_gn_relu(cin, cout, k, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2),
                                 nn.GroupNorm(groups, cout), nn.ReLU())

        self.incre = nn.ModuleList(conv_gn_relu(c, h, 1) for c, h in zip(channels, head))
        self.down = nn.ModuleList(conv_gn_relu(head[i], head[i + 1], 3, stride=2) for i in range(len(head) - 1))
        self.final = conv_gn_relu(head[-1], final, 1)
        features = final if pool == "avg" else final * coarsest[0] * coarsest[1]
        self.linear = nn.Linear(features, num_classes)

    def forward(self, branches: Sequence[Tensor]) -> Tensor:
        y = self.incre[0](branches[0])
        for i, down in enumerate(self.down):
            y = down(y) + self.incre[i + 1](branches[i + 1])
        y = self.final(y)
        return self.linear(y.mean(dim=(-2, -1)) if self.pool == "avg" else y.flatten(1))


class MDEQ(nn.Module):
    """MDEQ classifier: stem → DEQ of :class:`MDEQCell` → :class:`MDEQHead`.

    ``model(images, **overrides)`` → logits ``(B, num_classes)`` for images
    ``(B, in_channels, H, W)`` (H, W divisible by 2^(branches−1)); overrides (``tol``,
    ``solver``, ``store_trajectory`` …) go to the solve and ``model.deq.last_info`` holds its
    statistics. ``channels``: branch widths, finest first (their number is the number of
    branches); ``pool``: the head's "avg" (global average pooling, the paper's) or "flatten"
    (needs ``image_size``, the images' H and W); ``solver_options`` go to ``deqdiff.DEQ`` (defaults: Anderson, relative tolerance
    1e-2, at most 50 iterations, as the conv DEQ of this package; derivative solves by Anderson,
    which on the digits model at initialization needs about 20 iterations where the default
    Richardson iteration needs 75).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, channels: Sequence[int] = (16, 32),
                 hidden: Sequence[int] | None = None, head_channels: Sequence[int] | None = None,
                 final_channels: int | None = None, pool: str = "avg", image_size: int | tuple[int, int] | None = None,
                 groups: int = 4, dropout: float = 0.0, init_std: float = 0.01,
                 solver: str = "anderson", tol: float = 1e-2, max_iter: int = 50, backward_solver: str = "anderson",
                 **solver_options):
        super().__init__()
        cell = MDEQCell(channels, hidden, groups=groups, dropout=dropout, init_std=init_std)
        self.stem = MDEQStem(in_channels, cell.channels[0], groups=groups)
        self.deq = DEQ(cell, solver=solver, tol=tol, max_iter=max_iter, backward_solver=backward_solver,
                       **solver_options)
        coarsest = None
        if image_size is not None:
            h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
            coarsest = tuple(c for c in cell.branch_shapes(torch.empty(0, 0, h, w))[-1][1:])
        self.head = MDEQHead(cell.channels, num_classes, head_channels=head_channels,
                             final_channels=final_channels, groups=groups, pool=pool, coarsest=coarsest)

    @property
    def cell(self) -> MDEQCell:
        return self.deq.cell

    def injection(self, images: Tensor) -> Tensor:
        """The injected input ``x`` ``(B, C_0, H, W)`` of the cell."""
        # under autocast the stem may return bfloat16; the state has the parameters' dtype
        return self.stem(images).to(self.head.linear.weight.dtype)

    def equilibrium(self, images: Tensor, **overrides) -> Tensor:
        """The flat equilibrium state z* ``(B, N)`` (see :meth:`MDEQCell.branches`)."""
        return self.deq(self.injection(images), **overrides)

    def forward(self, images: Tensor, **overrides) -> Tensor:
        x = self.injection(images)
        z = self.deq(x, **overrides)
        return self.head(self.cell.branches(z, x))


#: named configurations: the tiny digits model (8×8 and 4×4 branches) and the four-resolution
#: shape of the paper's CIFAR-10 models (32×32, 16×16, 8×8, 4×4; widths doubling per branch)
CONFIGS: dict[str, dict] = {
    "digits": dict(in_channels=1, num_classes=10, channels=(16, 32), pool="flatten", image_size=8),
    "cifar10": dict(in_channels=3, num_classes=10, channels=(16, 32, 64, 128), dropout=0.25),
}


def mdeq_digits(**overrides) -> MDEQ:
    """The tiny MDEQ for 8×8 scikit-learn digits: branches 16×8×8 and 32×4×4, no dropout, the
    head flattening the 4×4 map."""
    return MDEQ(**{**CONFIGS["digits"], **overrides})


def mdeq_cifar10(**overrides) -> MDEQ:
    """The four-branch MDEQ for 3×32×32 CIFAR-10 images (branches at 32, 16, 8, 4 pixels)."""
    return MDEQ(**{**CONFIGS["cifar10"], **overrides})
