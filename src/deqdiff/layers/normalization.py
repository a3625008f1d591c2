"""Weight normalization and spectral normalization of any DEQ cell.

* **Weight norm** (Salimans & Kingma 2016, "Weight normalization", eq. 2): ``w = g · v / ‖v‖``
  per output unit, as the parametrization :class:`WeightNorm` (same parameter names and values as
  ``torch.nn.utils.parametrizations.weight_norm``: ``original0`` = g, ``original1`` = v). PyTorch's
  own one calls ``torch._weight_norm``, whose second derivative with respect to ``v`` is wrong in
  torch 2.13 on the CPU (gradgradcheck fails); DEQ derivatives of every order go through the
  weights, so the formula is written out in differentiable operations. It is a pure function of
  ``(g, v)``: safe inside a solve.
* **Spectral norm** (Miyato, Kataoka, Koyama & Yoshida 2018, "Spectral normalization for generative
  adversarial networks", eq. 8 and Algorithm 1): ``W ↦ c · W / σ(W)`` with ``σ(W) ≈ uᵀ W v``
  estimated by power iteration on ``W`` reshaped to ``(out, in·k…)``. PyTorch's parametrization runs
  a power-iteration step *every time the weight is read* in training mode; inside a DEQ the solver
  reads it at every iteration, so each iteration would see a different operator (and the in-place
  update of ``u``, ``v`` would corrupt the saved tensors of the derivative solves).
  :class:`SpectralNorm` therefore never iterates when the weight is read: ``update()`` advances the
  power iteration, once per training step, and ``deqdiff.DEQ.forward`` calls it (through
  :func:`update_spectral_norms`) before each forward solve in training mode. Every solve of a step
  — forward and derivatives — sees one operator ``c · W / (uᵀ W v)`` with ``u, v`` constants, and
  its derivatives w.r.t. ``W`` (of every order) are exact. ``u`` and ``v`` are buffers, saved in
  ``state_dict`` (checkpoints resume bit-exactly), replaced (not modified in place) by ``update``.

For a convolution, σ of the reshaped kernel is Miyato et al.'s bound, not the operator norm of the
convolution; ``c < 1`` with a 1-Lipschitz activation makes a dense layer contractive, not a
convolution in general.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["WeightNorm", "SpectralNorm", "weight_norm", "spectral_norm", "apply_weight_norm", "apply_spectral_norm", "update_spectral_norms",
           "NORMALIZED_LAYERS"]

#: layers whose ``weight`` the cell-wide helpers normalize
NORMALIZED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


class WeightNorm(nn.Module):
    """Parametrization ``(g, v) ↦ g · v / ‖v‖`` with the norm over every dimension but ``dim``
    (``dim=None``: over the whole tensor), Salimans & Kingma 2016 eq. 2. ``right_inverse`` splits a
    weight into ``g = ‖w‖`` and ``v = w``, as PyTorch's ``weight_norm`` does."""

    def __init__(self, dim: int | None = 0):
        super().__init__()
        self.dim = dim

    def _norm(self, v: Tensor) -> Tensor:
        if self.dim is None:
            return torch.linalg.vector_norm(v)
        dims = [d for d in range(v.ndim) if d != self.dim % v.ndim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return v * (g / self._norm(v))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Register :class:`WeightNorm` on ``module.<name>`` (in place; returns ``module``)."""
    parametrize.register_parametrization(module, name, WeightNorm(dim))
    return module


class SpectralNorm(nn.Module):
    """Parametrization ``W ↦ coeff · W / (uᵀ W_mat v)``, ``W_mat`` = ``W`` with dim ``dim`` first
    and the rest flattened, ``(h, w)``; ``u`` ``(h,)`` and ``v`` ``(w,)`` are unit buffers.

    ``update(weight, n)`` runs ``n`` power-iteration steps (default ``n_power_iterations``) without
    a graph; reading the weight never does. At construction 15 steps from random unit vectors
    are run, as PyTorch does. Raises ``ValueError`` for a weight with fewer than 2 dimensions,
    ``n_power_iterations < 1`` or ``coeff <= 0``."""

    def __init__(self, weight: Tensor, *, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 coeff: float = 1.0):
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(f"SpectralNorm needs a weight with >= 2 dimensions, got shape {tuple(weight.shape)}")
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        if not coeff > 0:
            raise ValueError(f"coeff must be > 0, got {coeff}")
        self.dim = dim % weight.ndim
        self.eps, self.coeff, self.n_power_iterations = float(eps), float(coeff), int(n_power_iterations)
        h, w = self._matrix(weight).shape
        u = weight.new_empty(h).normal_(0, 1)
        v = weight.new_empty(w).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
        self.update(weight, 15)

    def _matrix(self, weight: Tensor) -> Tensor:
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    @torch.no_grad()
    def update(self, weight: Tensor, n: int | None = None) -> None:
        """Advance the power iteration on ``weight`` (the unnormalized one) by ``n`` steps."""
        mat = self._matrix(weight.detach())
        u, v = self._u, self._v
        for _ in range(self.n_power_iterations if n is None else n):
            u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(mat.H, u), dim=0, eps=self.eps)
        # new tensors, not in-place: graphs of earlier solves keep the (u, v) they were built with
        self._u, self._v = u, v

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate ``uᵀ W_mat v`` (differentiable in ``weight``; u, v constant)."""
        return torch.vdot(self._u, torch.mv(self._matrix(weight), self._v))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (self.coeff / self.sigma(weight))

    def extra_repr(self) -> str:
        return f"n_power_iterations={self.n_power_iterations}, dim={self.dim}, coeff={self.coeff}"


def spectral_norm(module: nn.Module, name: str = "weight", *, n_power_iterations: int = 1, dim: int | None = None,
                  eps: float = 1e-12, coeff: float = 1.0) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>`` (in place; returns ``module``). ``dim``
    defaults to 1 for transposed convolutions and 0 otherwise, as in PyTorch."""
    weight = getattr(module, name)
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations=n_power_iterations, dim=dim, eps=eps, coeff=coeff))
    return module


def _targets(cell: nn.Module, layers: Iterable[type[nn.Module]]) -> list[nn.Module]:
    layers = tuple(layers)
    found = [m for m in cell.modules() if isinstance(m, layers) and isinstance(getattr(m, "weight", None), Tensor)
             and m.weight.ndim >= 2 and not parametrize.is_parametrized(m, "weight")]
    if not found:
        raise ValueError(f"{type(cell).__name__} has no un-normalized weight in layers "
                         f"{[t.__name__ for t in layers]} to normalize")
    return found


def apply_weight_norm(cell: nn.Module, *, dim: int = 0, layers: Iterable[type[nn.Module]] = NORMALIZED_LAYERS) -> nn.Module:
    """Weight-normalize (Salimans & Kingma 2016) the ``weight`` of every layer of ``cell`` of the
    given types with :class:`WeightNorm` (in place; returns ``cell``). Its parameters become
    ``….parametrizations.weight.original0`` (g) and ``original1`` (v). Raises ``ValueError`` when
    no such weight exists."""
    for m in _targets(cell, layers):
        weight_norm(m, "weight", dim=dim)
    return cell


def apply_spectral_norm(cell: nn.Module, *, n_power_iterations: int = 1, eps: float = 1e-12, coeff: float = 1.0,
                        layers: Iterable[type[nn.Module]] = NORMALIZED_LAYERS) -> nn.Module:
    """Spectral-normalize the ``weight`` of every layer of ``cell`` of the given types with
    :class:`SpectralNorm` (in place; returns ``cell``). Raises ``ValueError`` when no such weight
    exists."""
    for m in _targets(cell, layers):
        spectral_norm(m, "weight", n_power_iterations=n_power_iterations, eps=eps, coeff=coeff)
    return cell


def update_spectral_norms(module: nn.Module) -> int:
    """One power-iteration update (``n_power_iterations`` steps) of every :class:`SpectralNorm`
    inside ``module`` whose module is in training mode; returns how many were updated.
    ``deqdiff.DEQ.forward`` calls it on its cell before each forward solve in training mode."""
    count = 0
    for m in module.modules():
        if not m.training or not parametrize.is_parametrized(m):
            continue
        for name, plist in m.parametrizations.items():
            for i, p in enumerate(plist):
                if isinstance(p, SpectralNorm):
                    p.update(_input_of(plist, i, name))
                    count += 1
    return count


def _input_of(plist, i: int, name: str) -> Tensor:
    """The weight as it enters the ``i``-th parametrization of ``plist`` (after the earlier ones)."""
    if not hasattr(plist, "original"):
        raise NotImplementedError(f"SpectralNorm on '{name}' after a parametrization with several "
                                  "originals (e.g. weight_norm) is not supported; normalize with one of them")
    w = plist.original
    with torch.no_grad():
        for p in list(plist)[:i]:
            w = p(w)
    return w
