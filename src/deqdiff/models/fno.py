"""Fourier neural operators as a DEQ (FNO-DEQ) and explicitly (weight-tied or untied).

* :class:`SpectralConv2d` — the Fourier layer's global convolution (Li et al. 2021, "Fourier
  neural operator for parametric partial differential equations", eq. 4–5): rfft2, a learned
  complex ``C_in × C_out`` matrix on each of the lowest ``modes1 × modes2`` frequencies (both
  signs of k₁, k₂ ≥ 0), zero elsewhere, irfft2.
* :class:`FourierCell` — the cell ``f(z, x) = σ(W z + K z + x)``: spectral convolution K,
  pointwise linear W (1×1 convolution with bias), GELU σ, and input injection of the lifted
  coefficient field x (Marwah, Pokle, Kolter, Lipton & Lu 2023, "Deep equilibrium based neural
  operators for steady-state PDEs", §4, the FNO-DEQ block).
* :class:`FNODEQ` — lift P (pointwise, from (a, x₁, x₂)) → z* = f(z*, P a) by a ``deqdiff.DEQ``
  (every derivative an implicit solve) → project Q (pointwise two-layer MLP).
* :class:`FNOExplicit` — the same lift, cell and projection with the cell applied ``k`` times
  from z = 0: ``tied=True`` (default) shares one cell, so its parameters equal the DEQ's exactly
  (FNO-WT in Marwah et al.); ``tied=False`` uses ``k`` independent cells (the standard FNO of
  Li et al., k times the cell's parameters).

Inputs ``(B, s₁, s₂)`` or ``(B, 1, s₁, s₂)`` coefficient fields on the nodes of [0, 1]²,
outputs ``(B, s₁, s₂)``. Normalization (pointwise mean/std of the training inputs and outputs,
as Li et al.'s ``UnitGaussianNormalizer``) lives in buffers set by :meth:`set_normalization`; with
``zero_boundary`` the output is multiplied by the interior indicator, so u = 0 on the boundary
holds exactly (the Dirichlet condition of Darcy flow; the same for both models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from .conv import WeightTied

__all__ = ["ChannelLinear", "SpectralConv2d", "FourierCell", "FNODEQ", "FNOExplicit", "spectral_conv2d", "count_parameters"]


def spectral_conv2d(x: Tensor, weight: Tensor, modes1: int, modes2: int) -> Tensor:
    """The spectral convolution of ``x`` ``(B, C_in, H, W)`` with ``weight``
    ``(2, C_in, C_out, modes1, modes2, 2)`` (real and imaginary parts, last dim; block 0 for
    k₁ ∈ [0, modes1), block 1 for k₁ ∈ [H − modes1, H)). Returns ``(B, C_out, H, W)`` real.

    Raises ``ValueError`` if the modes do not fit the grid (2·modes1 ≤ H, modes2 ≤ W//2 + 1)."""
    B, _, H, W = x.shape
    if 2 * modes1 > H or modes2 > W // 2 + 1:
        raise ValueError(f"modes ({modes1}, {modes2}) do not fit a {H}×{W} grid (need 2·modes1 ≤ {H}, modes2 ≤ {W // 2 + 1})")
    w = torch.complex(weight[..., 0], weight[..., 1])
    xh = torch.fft.rfft2(x)  # (B, C_in, H, W//2+1)
    low = torch.einsum("bixy,ioxy->boxy", xh[:, :, :modes1, :modes2], w[0])
    high = torch.einsum("bixy,ioxy->boxy", xh[:, :, H - modes1:, :modes2], w[1])
    C_out = weight.shape[2]
    # assembled by concatenation, not in-place writes, so forward-mode AD and vmap see plain ops
    mid = low.new_zeros(B, C_out, H - 2 * modes1, modes2)
    cols = torch.cat([low, mid, high], dim=2)
    out = torch.cat([cols, cols.new_zeros(B, C_out, H, W // 2 + 1 - modes2)], dim=3)
    return torch.fft.irfft2(out, s=(H, W))


class ChannelLinear(nn.Linear):
    """A linear map of the channels at every grid node, ``(B, C_in, H, W) → (B, C_out, H, W)``
    (a 1×1 convolution; as a matrix product over channels-last it runs faster on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)


class SpectralConv2d(nn.Module):
    """Fourier layer K of Li et al. 2021 (eq. 5): ``(B, C_in, H, W) → (B, C_out, H, W)``.

    Weights N(0, ``scale``²) per real and imaginary part, ``scale = 1/(C_in·C_out)`` by
    default (Li et al.'s initialization magnitude)."""

    def __init__(self, in_channels: int, out_channels: int, modes1: int, modes2: int, *, scale: float | None = None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("modes1", modes1), ("modes2", modes2)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v}")
        self.modes1, self.modes2 = int(modes1), int(modes2)
        scale = 1.0 / (in_channels * out_channels) if scale is None else scale
        self.weight = nn.Parameter(scale * torch.randn(2, in_channels, out_channels, modes1, modes2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return spectral_conv2d(x, self.weight, self.modes1, self.modes2)


class FourierCell(nn.Module):
    """``f(z, x) = GELU(W z + K z + x)`` on states ``(B, width, H, W)``; ``x`` the injected input
    of the same shape. ``scale`` multiplies the initial weights of W and K (small: the cell starts
    near a contraction, so the DEQ's forward solve converges from the first step)."""

    def __init__(self, width: int, modes1: int, modes2: int, *, scale: float = 0.5):
        super().__init__()
        self.width = int(width)
        self.spectral = SpectralConv2d(width, width, modes1, modes2)
        self.pointwise = ChannelLinear(width, width)
        with torch.no_grad():
            self.spectral.weight.mul_(scale)
            self.pointwise.weight.mul_(scale)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return F.gelu(self.spectral(z) + self.pointwise(z) + x)

    def init_state(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class _Untied(nn.Module):
    """``k`` independent cells applied in sequence from z = 0 (the standard, untied FNO)."""

    def __init__(self, cells: list[nn.Module]):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.k = len(cells)

    def forward(self, x: Tensor) -> Tensor:
        z = self.cells[0].init_state(x)
        for cell in self.cells:
            z = cell(z, x)
        return z


class _FNO(nn.Module):
    """Lift → core → project, with pointwise normalization and the zero-boundary mask."""

    def __init__(self, resolution: int | tuple[int, int], width: int, modes: int | tuple[int, int],
                 projection: int, zero_boundary: bool):
        super().__init__()
        s1, s2 = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        m1, m2 = (modes, modes) if isinstance(modes, int) else tuple(modes)
        if 2 * m1 > s1 or m2 > s2 // 2 + 1:
            raise ValueError(f"modes ({m1}, {m2}) do not fit a {s1}×{s2} grid (need 2·modes ≤ {s1}, modes ≤ {s2 // 2 + 1})")
        self.resolution, self.modes, self.width = (s1, s2), (m1, m2), int(width)
        self.lift = ChannelLinear(3, width)  # (a, x₁, x₂) → width, pointwise
        self.project = nn.Sequential(ChannelLinear(width, projection), nn.GELU(), ChannelLinear(projection, 1))
        self.zero_boundary = bool(zero_boundary)
        self.register_buffer("a_mean", torch.zeros(s1, s2))
        self.register_buffer("a_std", torch.ones(s1, s2))
        self.register_buffer("u_mean", torch.zeros(s1, s2))
        self.register_buffer("u_std", torch.ones(s1, s2))
        mask = torch.zeros(s1, s2)
        mask[1:-1, 1:-1] = 1.0
        self.register_buffer("mask", mask)
        g1, g2 = torch.meshgrid(torch.linspace(0, 1, s1), torch.linspace(0, 1, s2), indexing="ij")
        self.register_buffer("grid", torch.stack([g1, g2]))

    @torch.no_grad()
    def set_normalization(self, a: Tensor, u: Tensor, eps: float = 1e-5) -> None:
        """Pointwise mean/std of the training fields ``a``, ``u`` ``(N, s₁, s₂)``."""
        a, u = torch.as_tensor(a), torch.as_tensor(u)
        self.a_mean.copy_(a.mean(0))
        self.a_std.copy_(a.std(0) + eps)
        self.u_mean.copy_(u.mean(0))
        self.u_std.copy_(u.std(0) + eps)

    def _prepare(self, a: Tensor) -> Tensor:
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3 or tuple(a.shape[1:]) != self.resolution:
            raise ValueError(f"expected coefficient fields of shape (B, {self.resolution[0]}, {self.resolution[1]}), got {tuple(a.shape)}")
        return a

    def inject(self, a: Tensor) -> Tensor:
        """The lifted input ``P(a, x₁, x₂)``, ``(B, width, s₁, s₂)``."""
        a = (self._prepare(a).to(self.a_mean.dtype) - self.a_mean) / self.a_std
        grid = self.grid.expand(a.shape[0], -1, -1, -1)
        return self.lift(torch.cat([a.unsqueeze(1), grid], dim=1))

    def decode(self, z: Tensor) -> Tensor:
        u = self.project(z)[:, 0] * self.u_std + self.u_mean
        return u * self.mask if self.zero_boundary else u

    def equilibrium(self, a: Tensor, **overrides) -> Tensor:
        raise NotImplementedError

    def forward(self, a: Tensor, **overrides) -> Tensor:
        return self.decode(self.equilibrium(a, **overrides))


class FNODEQ(_FNO):
    """FNO-DEQ (Marwah et al. 2023): ``u = Q(z*)`` with ``z* = FourierCell(z*, P(a))``.

    ``resolution``: nodes per side (int or pair); ``width``: channels of the state; ``modes``:
    Fourier modes kept per dimension; ``projection``: hidden channels of Q. ``solver_options``
    go to ``deqdiff.DEQ`` (default Anderson, relative tolerance 1e-3, at most 40 iterations,
    ``on_fail="warn"``: a solve above tolerance warns with its residual). ``model(a, **overrides)``
    passes overrides (``tol``, ``max_iter`` …) to the solve; ``model.deq.last_info`` holds its
    statistics."""

    def __init__(self, resolution: int | tuple[int, int] = 32, *, width: int = 16, modes: int | tuple[int, int] = 8,
                 projection: int = 64, zero_boundary: bool = True, cell_scale: float = 0.5,
                 solver: str = "anderson", tol: float = 1e-3, max_iter: int = 40, **solver_options):
        super().__init__(resolution, width, modes, projection, zero_boundary)
        cell = FourierCell(width, *self.modes, scale=cell_scale)
        self.deq = DEQ(cell, solver=solver, tol=tol, max_iter=max_iter, **solver_options)

    @property
    def cell(self) -> FourierCell:
        return self.deq.cell

    def equilibrium(self, a: Tensor, **overrides) -> Tensor:
        return self.deq(self.inject(a), **overrides)


class FNOExplicit(_FNO):
    """The explicit FNO: lift, ``k`` Fourier-cell applications from z = 0, project; trained by
    ordinary backpropagation. ``tied=True``: one cell applied k times (the parameters equal
    :class:`FNODEQ`'s with the same settings); ``tied=False``: k independent cells. It has no ``deq``."""

    def __init__(self, resolution: int | tuple[int, int] = 32, *, k: int = 6, tied: bool = True, width: int = 16,
                 modes: int | tuple[int, int] = 8, projection: int = 64, zero_boundary: bool = True,
                 cell_scale: float = 0.5):
        super().__init__(resolution, width, modes, projection, zero_boundary)
        if int(k) != k or k < 1:
            raise ValueError(f"k (cell applications) must be an integer ≥ 1, got {k}")
        self.tied = bool(tied)
        if self.tied:
            self.core = WeightTied(FourierCell(width, *self.modes, scale=cell_scale), int(k))
        else:
            self.core = _Untied([FourierCell(width, *self.modes, scale=cell_scale) for _ in range(int(k))])

    @property
    def k(self) -> int:
        return self.core.k

    def equilibrium(self, a: Tensor, **_) -> Tensor:
        return self.core(self.inject(a))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

