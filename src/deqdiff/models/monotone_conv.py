"""Convolutional monotone DEQ (Winston & Kolter 2020 §4; Nguyen 2022 §2.3.2).

``W = (1 − m)I − AᵀA + B − Bᵀ`` with A, B circular (periodic) k×k convolutions C → C, so
``I − W ⪰ mI`` holds as an operator on ``(C, H, W)`` images. Circular convolutions are
diagonalized by the 2-D DFT: at frequency ω a convolution is the C×C matrix
``K̂(ω) = Σ_{a,b} K[:, :, a, b] e^{+2πi(ω₁(a−p)/H + ω₂(b−p)/W)}`` (PyTorch convolutions are
correlations; p = k // 2) and the adjoint is ``K̂(ω)ᴴ``. Hence

    (I − W)^(ω) = mI + ÂᴴÂ − B̂ + B̂ᴴ,      (I + α(I − W))⁻¹ = per-frequency inverse of I + α(I − W)^(ω),

``H·W`` small C×C complex inverses: the PR resolvent costs two FFTs and a batched C×C product,
and ``L = ‖I − W‖₂ = max_ω ‖(I − W)^(ω)‖₂`` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from ..solvers.splitting import MonotoneSplit, ProxActivation, _blocked, _lower_blocks, get_activation
from .monotone import MonotoneModelMixin, fb_contraction_factor, lipschitz_bound, state_norm_bound

__all__ = ["circular_conv", "circular_conv_adjoint", "conv_symbol", "FourierMonotone", "MonotoneConv", "MonotoneConvDEQ"]


def circular_conv(z: Tensor, K: Tensor) -> Tensor:
    """Periodic same-size correlation of ``z`` ``(B, C, H, W)`` with an odd k×k kernel."""
    p = K.shape[-1] // 2
    return F.conv2d(F.pad(z, (p, p, p, p), mode="circular"), K)


def circular_conv_adjoint(y: Tensor, K: Tensor) -> Tensor:
    """Adjoint of :func:`circular_conv`: correlation with the flipped, channel-transposed kernel."""
    return circular_conv(y, K.transpose(0, 1).flip(-1, -2))


def conv_symbol(K: Tensor, H: int, W: int) -> Tensor:
    """Per-frequency matrices ``K̂(ω)`` of the circular correlation, shape ``(H, W, C_out, C_in)``."""
    k = K.shape[-1]
    if H < k or W < k:
        raise ValueError(f"image {H}×{W} is smaller than the {k}×{k} kernel")
    p = k // 2
    img = K.new_zeros(*K.shape[:2], H, W)
    img[:, :, :k, :k] = K
    img = torch.roll(img, shifts=(-p, -p), dims=(2, 3))
    return torch.conj(torch.fft.fft2(img)).permute(2, 3, 0, 1)


class FourierMonotone(MonotoneSplit):
    """Splitting structure of a circular-convolution monotone DEQ on rows ``(S, C·H·W)``.

    Under ``torch.func.vmap`` over parameter sets (:meth:`MonotoneSplit.vmap_rows`) the kernels
    differ per copy: the symbol then holds one block per copy ``(G, H, W, C, C)`` and W v is
    applied in Fourier space, ``W v = v − F⁻¹[(I − W)^(ω) v̂(ω)]`` (a batched product instead of
    G sets of convolutions)."""

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, activation: ProxActivation, m: float, shape):
        super().__init__(activation, c, m)
        self.A, self.B = A.detach(), B.detach()
        self.shape = tuple(shape)  # (C, H, W)
        C, H, W = self.shape
        Ah, Bh = conv_symbol(self.A, H, W), conv_symbol(self.B, H, W)
        eye = torch.eye(C, dtype=Ah.dtype, device=Ah.device)
        self.symbol = m * eye + Ah.mH @ Ah - Bh + Bh.mH  # (I − W)^(ω), (H, W, C, C)
        self._inv: dict[float, Tensor] = {}

    def _img(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], *self.shape)

    def _fourier(self, v: Tensor, mats: Tensor) -> Tensor:
        """Rows of F⁻¹[M(ω) v̂(ω)] for per-frequency matrices ``mats`` (blocks ``(G, H, W, C, C)``)."""
        z = self._img(v)
        xh = torch.fft.fft2(z).permute(0, 2, 3, 1)  # (S, H, W, C)
        if mats.ndim == 5:  # one block of rows per copy
            yh = (mats.unsqueeze(1) @ _blocked(xh, mats.shape[0]).unsqueeze(-1)).squeeze(-1)
            yh = yh.reshape(xh.shape)
        else:
            yh = (mats @ xh.unsqueeze(-1)).squeeze(-1)
        return torch.fft.ifft2(yh.permute(0, 3, 1, 2)).real.reshape(v.shape)

    def matvec(self, v, transposed=False):
        if self.symbol.ndim == 5:
            return v - self._fourier(v, self.symbol.mH if transposed else self.symbol)
        z = self._img(v)
        sign = -1.0 if transposed else 1.0
        Az = circular_conv(z, self.A)
        out = (1 - self.m) * z - circular_conv_adjoint(Az, self.A) + sign * (
            circular_conv(z, self.B) - circular_conv_adjoint(z, self.B)
        )
        return out.reshape(v.shape)

    def resolvent(self, v, alpha, transposed=False):
        key = float(alpha)
        if key not in self._inv:
            eye = torch.eye(self.shape[0], dtype=self.symbol.dtype, device=self.symbol.device)
            self._inv[key] = torch.linalg.inv(eye + alpha * self.symbol)
        return self._fourier(v, self._inv[key].mH if transposed else self._inv[key])

    def _op_norm(self):
        return torch.linalg.matrix_norm(self.symbol, 2).max()

    def _lower_operator(self, size):
        self.symbol = _lower_blocks(self.symbol, size, 4)
        if self.symbol.ndim == 5:  # per-copy kernels: W is applied through the symbol only
            self.A = self.B = None
        else:
            self.A, self.B = _lower_blocks(self.A, size, 4), _lower_blocks(self.B, size, 4)
        self._inv = {}


class MonotoneConv(nn.Module):
    """Cell ``f(z, x) = σ(W z + U x)``: W as above on states ``(B, channels, H, W)``; U a
    zero-padded k×k convolution with bias from ``in_channels`` to ``channels``."""

    def __init__(self, in_channels: int, channels: int, image_size, *, kernel_size: int = 3,
                 m: float = 0.05, activation: str = "relu", **act_kwargs):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if not m > 0:
            raise ValueError(f"monotonicity parameter m must be > 0, got {m}")
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if H < kernel_size or W < kernel_size:
            raise ValueError(f"image {H}×{W} is smaller than the kernel ({kernel_size})")
        self.in_channels, self.channels, self.image_size, self.m = in_channels, channels, (H, W), float(m)
        self.activation = get_activation(activation, **act_kwargs)
        self.U = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.A = nn.Conv2d(channels, channels, kernel_size, bias=False)  # used as kernels only
        self.B = nn.Conv2d(channels, channels, kernel_size, bias=False)

    def multiply(self, z: Tensor) -> Tensor:
        """``W z = (1 − m)z − Aᵀ(A z) + B z − Bᵀ z`` (circular convolutions)."""
        A, B = self.A.weight, self.B.weight
        return (1 - self.m) * z - circular_conv_adjoint(circular_conv(z, A), A) + circular_conv(z, B) - circular_conv_adjoint(z, B)

    def inject(self, x: Tensor) -> Tensor:
        return self.U(x)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.activation(self.multiply(z) + self.inject(x))

    def init_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.channels, *self.image_size)

    def state_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    def structure(self, x: Tensor) -> FourierMonotone:
        with torch.no_grad():
            c = self.inject(x.detach())
            return FourierMonotone(self.A.weight, self.B.weight, c.reshape(c.shape[0], -1),
                                   self.activation, self.m, self.state_shape())

    def op_norm(self) -> float:
        """L = ‖I − W‖₂ (exact, from the Fourier symbol)."""
        dummy = self.A.weight.new_zeros(1, self.channels * self.image_size[0] * self.image_size[1])
        return FourierMonotone(self.A.weight, self.B.weight, dummy, self.activation, self.m, self.state_shape()).op_norm()

    def injection_norm(self) -> float:
        """‖U‖₂ of the zero-padded input convolution (without bias), by power iteration on UᵀU."""
        Wt = self.U.weight.detach()
        p = self.U.padding
        v = torch.randn(1, self.in_channels, *self.image_size, dtype=Wt.dtype, device=Wt.device,
                        generator=torch.Generator(device=Wt.device).manual_seed(0))
        sigma = 0.0
        for _ in range(200):
            v = v / v.norm()
            u = F.conv2d(v, Wt, padding=p)
            w = F.conv_transpose2d(u, Wt, padding=p)
            new = float(w.norm()) ** 0.5
            if abs(new - sigma) <= 1e-10 * max(new, 1e-30):
                sigma = new
                break
            sigma, v = new, w
        return sigma * (1 + 1e-6)  # power iteration approaches from below

    def lipschitz_bound(self) -> float:
        return lipschitz_bound(self.injection_norm(), self.m)

    def state_norm_bound(self, x: Tensor) -> Tensor:
        if not self.activation.zero_at_zero:
            raise ValueError(f"the state bound needs σ(0) = 0, which {self.activation!r} does not satisfy")
        H, W = self.image_size
        b_norm = float(self.U.bias.detach().norm()) * (H * W) ** 0.5
        return state_norm_bound(self.injection_norm(), x.reshape(x.shape[0], -1).norm(dim=1), self.m, b_norm)

    def fb_contraction_factor(self, alpha: float) -> float:
        return fb_contraction_factor(alpha, self.m, self.op_norm())


class MonotoneConvDEQ(MonotoneModelMixin, nn.Module):
    """Image classifier: ``images ↦ z* ↦`` average pooling by ``pool`` ``↦`` linear.

    Arguments as :class:`~deqdiff.models.MonotoneDEQ`; inputs ``(B, in_channels, H, W)`` (flat
    ``(B, in_channels·H·W)`` rows are reshaped)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        image_size,
        num_classes: int,
        *,
        m: float = 0.05,
        solver: str = "pr",
        alpha: float | None = None,
        tol: float = 1e-4,
        max_iter: int = 100,
        kernel_size: int = 3,
        pool: int = 2,
        activation: str = "relu",
        backward_solver: str = "auto",
        backward_alpha: float | None = None,
        **solver_options,
    ):
        super().__init__()
        cell = MonotoneConv(in_channels, channels, image_size, kernel_size=kernel_size, m=m, activation=activation)
        H, W = cell.image_size
        if H % pool or W % pool:
            raise ValueError(f"pool={pool} must divide the image size {H}×{W}")
        self.deq = DEQ(cell)  # registered once; ``self.cell`` is a property
        self.pool = pool
        self.head = nn.Linear(channels * (H // pool) * (W // pool), num_classes)
        self._configure(solver, alpha, tol, max_iter, backward_solver, backward_alpha, solver_options)

    def _prepare(self, x: Tensor) -> Tensor:
        C, (H, W) = self.cell.in_channels, self.cell.image_size
        if x.ndim == 2 and x.shape[1] == C * H * W:
            x = x.reshape(x.shape[0], C, H, W)
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"MonotoneConvDEQ expects images of shape (B, {C}, {H}, {W}), got {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor, **overrides) -> Tensor:
        z = self.equilibrium(x, **overrides)
        return self.head(F.avg_pool2d(z, self.pool).flatten(1))
