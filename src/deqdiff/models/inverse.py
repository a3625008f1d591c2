"""Deep equilibrium networks for linear inverse problems in imaging (Gilton, Ongie & Willett 2021,
"Deep equilibrium architectures for inverse problems in imaging", IEEE Trans. Comput. Imaging 7).

A measurement ``y = A x + noise`` of an image ``x`` is reconstructed as the fixed point z* of one
iteration of a learned optimization method. Two iterations of the paper are provided:

* ``form="prox"`` (proximal gradient, the paper's DE-Prox; the default)::

      z ← R_θ(z − η Aᵀ(A z − y)),        R_θ(u) = u − ε_θ(u)

  a gradient step on the data fidelity ½‖A z − y‖² followed by a learned residual denoiser;
* ``form="grad"`` (gradient descent, the paper's DE-Grad)::

      z ← z − η (Aᵀ(A z − y) + ε_θ(z))

  a gradient step on the data fidelity plus a learned regularizer whose gradient is ε_θ.

ε_θ is a small CNN (three 3×3 convolutions with ReLUs, :class:`ResidualDenoiser`). η is a fixed
step size (stated, not learned). An optional Tikhonov weight μ ≥ 0 replaces the data fidelity by
½‖A z − y‖² + (μ/2)‖z‖² (gradient Aᵀ(A z − y) + μ z); μ = 0 is the paper's cell, the models'
default μ = 0.1 makes the data step contract where A (a blur) nearly vanishes. The fixed point
is found by a ``deqdiff.DEQ`` starting from z₀ = Aᵀy, so every derivative order of the
reconstruction is an implicit solve. The baseline :class:`InverseUnrolled` applies the same cell
K times from z₀ = Aᵀy (weight-tied deep unrolling, trained by backpropagation through the K
steps); ``unrolled(cell, y, n)`` runs any trained cell for n plain iterations, which is how
test-time iteration counts are compared.

Contraction is not imposed: with ‖I − η(AᵀA + μI)‖₂ ≤ 1 − ημ (for η(‖A‖₂² + μ) ≤ 1) the prox
cell's Lipschitz constant is at most (1 − ημ)(1 + Lip(ε_θ)), which a learned ε_θ may push above 1,
so whether the learned cell contracts is measured (:func:`cell_lipschitz` at z*, and the
solver's residuals), not assumed. Measured on digits deblurring after training: ‖∂f/∂z‖₂ ≈ 0.97
at z*.

Forward operators (images ``(B, C, H, W)`` → measurements of the same shape): :class:`Identity`
(denoising) and :class:`Blur` / :class:`GaussianBlur` (deblurring: zero-padded "same"
convolution with a given kernel, whose adjoint is the correlation with the same kernel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DEQ
from .conv import WeightTied

__all__ = [
    "LinearOperator", "Identity", "Blur", "GaussianBlur", "gaussian_kernel", "ResidualDenoiser", "InverseCell",
    "InverseDEQ", "InverseUnrolled", "unrolled", "psnr", "cell_lipschitz", "FORMS",
]

FORMS = ("prox", "grad")


class LinearOperator(nn.Module):
    """A linear forward operator ``A`` on images ``(B, C, H, W)`` with its adjoint ``Aᵀ``
    (``⟨A x, y⟩ = ⟨x, Aᵀ y⟩``). Subclasses define :meth:`forward` and :meth:`adjoint`."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gram(self, x: Tensor) -> Tensor:
        """``AᵀA x``."""
        return self.adjoint(self.forward(x))

    def norm_bound(self) -> float:
        """An upper bound on the operator norm ‖A‖₂ (for choosing the step size η ≤ 2/‖A‖₂²)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def matrix(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense matrix of ``A`` on images of per-sample ``shape`` ``(C, H, W)``:
        ``(n, n)`` with ``n = C·H·W`` (for small checks only)."""
        n = math.prod(shape)
        basis = torch.eye(n, dtype=dtype, device=self._device()).reshape(n, *shape)
        return self.forward(basis).reshape(n, n).T

    def _device(self) -> torch.device:
        b = next(iter(self.buffers()), None)
        return b.device if b is not None else torch.device("cpu")


class Identity(LinearOperator):
    """``A = I``: denoising, ``y = x + noise``."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def norm_bound(self) -> float:
        return 1.0


def gaussian_kernel(size: int = 5, sigma: float = 1.0) -> Tensor:
    """A ``(size, size)`` Gaussian kernel exp(−(i² + j²)/(2σ²)) normalized to sum 1 (σ in pixels);
    ``ValueError`` unless ``size`` is odd and positive and σ > 0."""
    if not isinstance(size, int) or size < 1 or size % 2 != 1:
        raise ValueError(f"the blur kernel size must be an odd integer >= 1, got {size!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"the blur width sigma must be a finite number > 0, got {sigma!r}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).to(torch.get_default_dtype())


class Blur(LinearOperator):
    """``A x = k ∗ x``: 2-D convolution of every channel with ``kernel`` ``(k, k)`` (odd k), zero
    padding, output of the input's size. ``Aᵀ y`` is the correlation of y with the kernel
    (``conv_transpose2d`` with the same weights), the exact adjoint of the zero-padded
    convolution. ‖A‖₂ ≤ Σ|kernel| (Young's inequality)."""

    def __init__(self, kernel: Tensor):
        super().__init__()
        kernel = torch.as_tensor(kernel)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
            raise ValueError(f"the blur kernel must be a square (k, k) tensor with odd k, got shape {tuple(kernel.shape)}")
        if not torch.isfinite(kernel).all():
            raise ValueError("the blur kernel has non-finite entries")
        # conv2d correlates; flipping makes A a true convolution with the given kernel
        self.register_buffer("weight", kernel.flip(0, 1).clone()[None, None])

    @property
    def kernel(self) -> Tensor:
        return self.weight[0, 0].flip(0, 1)

    def _weight(self, x: Tensor) -> Tensor:
        return self.weight.to(x.dtype).expand(x.shape[1], 1, -1, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._weight(x), padding=self.weight.shape[-1] // 2, groups=x.shape[1])

    def adjoint(self, y: Tensor) -> Tensor:
        return F.conv_transpose2d(y, self._weight(y), padding=self.weight.shape[-1] // 2, groups=y.shape[1])

    def norm_bound(self) -> float:
        return float(self.weight.abs().sum())


class GaussianBlur(Blur):
    """:class:`Blur` with :func:`gaussian_kernel` ``(size, sigma)``."""

    def __init__(self, sigma: float = 1.0, size: int = 5):
        super().__init__(gaussian_kernel(size, sigma))
        self.sigma, self.size = float(sigma), int(size)


class ResidualDenoiser(nn.Module):
    """``R_θ(u) = u − ε_θ(u)`` with ε_θ = conv₃ ∘ ReLU ∘ conv₂ ∘ ReLU ∘ conv₁ (3×3, same padding,
    ``channels → hidden → hidden → channels``). The last convolution starts at N(0, ``init_std``²)
    weights and zero bias, so R_θ starts close to the identity (and the cell to plain gradient
    steps on the data fidelity)."""

    def __init__(self, channels: int = 1, hidden: int = 32, *, init_std: float = 1e-3):
        super().__init__()
        for name, v in (("channels", channels), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.normal_(self.conv3.weight, 0.0, init_std)
        nn.init.zeros_(self.conv3.bias)

    def residual(self, u: Tensor) -> Tensor:
        """ε_θ(u)."""
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(u)))))

    def forward(self, u: Tensor) -> Tensor:
        return u - self.residual(u)


class InverseCell(nn.Module):
    """One iteration ``z ← f(z, y)`` of the learned reconstruction method (module docstring):
    ``form="prox"``: f = R_θ(z − ηAᵀ(Az − y)); ``form="grad"``: f = z − η(Aᵀ(Az − y) + ε_θ(z)).
    States and measurements ``(B, C, H, W)``; the initial state is ``Aᵀy``. ``ValueError`` for an
    unknown ``form``, a step size η ≤ 0 or a Tikhonov weight μ < 0 (or any of them not finite)."""

    def __init__(self, operator: LinearOperator, denoiser: ResidualDenoiser, *, step_size: float = 0.5,
                 form: str = "prox", tikhonov: float = 0.0):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"the step size eta must be a finite number > 0, got {step_size!r}")
        if not (isinstance(tikhonov, (int, float)) and math.isfinite(tikhonov) and tikhonov >= 0):
            raise ValueError(f"the Tikhonov weight mu must be a finite number >= 0, got {tikhonov!r}")
        self.operator, self.denoiser = operator, denoiser
        self.step_size, self.form, self.tikhonov = float(step_size), form, float(tikhonov)

    def data_step(self, z: Tensor, y: Tensor) -> Tensor:
        """``z − η (Aᵀ(A z − y) + μ z)``: one gradient step on ½‖A z − y‖² + (μ/2)‖z‖²."""
        A = self.operator
        grad = A.adjoint(A(z) - y)
        if self.tikhonov:
            grad = grad + self.tikhonov * z
        return z - self.step_size * grad

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if self.form == "prox":
            return self.denoiser(self.data_step(z, y))
        return self.data_step(z, y) - self.step_size * self.denoiser.residual(z)

    def init_state(self, y: Tensor) -> Tensor:
        return self.operator.adjoint(y)


def _cell(operator: LinearOperator, channels: int, hidden: int, step_size: float, form: str, tikhonov: float,
          init_std: float) -> InverseCell:
    return InverseCell(operator, ResidualDenoiser(channels, hidden, init_std=init_std), step_size=step_size, form=form,
                       tikhonov=tikhonov)


class InverseDEQ(nn.Module):
    """Reconstruction ``y ↦ z*`` with ``z* = f(z*, y)`` (:class:`InverseCell`), the DEQ of Gilton
    et al. 2021. ``model(y, **overrides)``: measurements ``(B, C, H, W)`` → reconstructions of
    the same shape; ``overrides`` (``tol``, ``max_iter``, ``solver`` …) go to the solve and
    ``model.deq.last_info`` holds its statistics. Solver defaults: Anderson to relative residual
    1e-4 in at most 50 iterations (measured on digits deblurring: trained at 1e-3 the cell drifted
    to ‖∂f/∂z‖₂ ≈ 0.998 and the exact fixed point lost 3.2 dB; at 1e-4 it stays within 0.1 dB),
    derivative solves by GMRES. ``tikhonov`` (μ, default 0.1)
    adds (μ/2)‖z‖² to the data fidelity: the data step then contracts by 1 − ημ on the blur's
    near-null space, where a plain gradient step does not contract at all."""

    def __init__(self, operator: LinearOperator, *, channels: int = 1, hidden: int = 32, step_size: float = 0.5,
                 form: str = "prox", tikhonov: float = 0.1, init_std: float = 1e-3, solver: str = "anderson",
                 tol: float = 1e-4, max_iter: int = 50, **solver_options):
        super().__init__()
        cell = _cell(operator, channels, hidden, step_size, form, tikhonov, init_std)
        # measured on 16×16 deblurring (batch 32): "auto" ran ~107 Richardson steps and a dense
        # tail per derivative solve (6.4 s), GMRES 11 iterations (0.4 s)
        solver_options.setdefault("backward_solver", "gmres")
        self.deq = DEQ(cell, solver=solver, tol=tol, max_iter=max_iter, **solver_options)

    @property
    def cell(self) -> InverseCell:
        return self.deq.cell

    def forward(self, y: Tensor, **overrides) -> Tensor:
        return self.deq(y, **overrides)


class InverseUnrolled(nn.Module):
    """The deep-unrolling baseline: the same cell applied ``k`` times from ``Aᵀy``, weight-tied,
    differentiated by backpropagation through the k steps. It has no ``deq``;
    ``model(y, iterations=n)`` runs n steps instead of k (test-time extrapolation)."""

    def __init__(self, operator: LinearOperator, *, k: int = 10, channels: int = 1, hidden: int = 32,
                 step_size: float = 0.5, form: str = "prox", tikhonov: float = 0.1, init_std: float = 1e-3):
        super().__init__()
        self.core = WeightTied(_cell(operator, channels, hidden, step_size, form, tikhonov, init_std), k)

    @property
    def cell(self) -> InverseCell:
        return self.core.cell

    @property
    def k(self) -> int:
        return self.core.k

    def forward(self, y: Tensor, iterations: int | None = None) -> Tensor:
        if iterations is None:
            return self.core(y)
        return unrolled(self.cell, y, iterations)


def unrolled(cell: InverseCell, y: Tensor, iterations: int, *, trajectory: bool = False) -> Tensor | list[Tensor]:
    """``z_n``: ``iterations`` plain applications of ``cell`` from ``z₀ = Aᵀy`` (with
    ``trajectory=True`` the list ``[z_0, …, z_n]``)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    z = cell.init_state(y)
    out = [z]
    for _ in range(iterations):
        z = cell(z, y)
        if trajectory:
            out.append(z)
    return out if trajectory else z


def psnr(estimate: Tensor, truth: Tensor, peak: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log₁₀(peak² / MSE)`` in dB (``(B,)``; images
    ``(B, …)`` with intensities in [0, peak])."""
    mse = (estimate - truth).flatten(1).pow(2).mean(1)
    return 10.0 * torch.log10(peak ** 2 / mse.clamp_min(torch.finfo(mse.dtype).tiny))


def cell_lipschitz(cell: nn.Module, z: Tensor, y: Tensor, *, iters: int = 30, seed: int = 0) -> Tensor:
    """Power-iteration estimate of ‖∂f/∂z‖₂ per sample at the states ``z`` (``(B,)``): the local
    Lipschitz constant of the cell; below 1 at z* means plain iteration contracts there."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
    v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (z.ndim - 1))
    z, y = z.detach(), y.detach()

    def f(s: Tensor) -> Tensor:
        return cell(s, y)

    est = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(iters):
        _, jv = torch.func.jvp(f, (z,), (v,))
        _, vjp = torch.func.vjp(f, z)
        w = vjp(jv)[0]  # JᵀJ v
        est = w.flatten(1).norm(dim=1).sqrt()
        v = w / w.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (z.ndim - 1))
    return est.detach()
