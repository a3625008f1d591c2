"""Variational dropout for DEQ cells: one Bernoulli mask per forward solve.

Ordinary dropout draws a new mask at every call; inside a DEQ the solver calls the cell tens of
times, so each iteration would see a different map and there would be no fixed point to find (and
no implicit derivative of it). Variational dropout (Gal & Ghahramani 2016, "A theoretically grounded
application of dropout in recurrent neural networks", §4) draws one mask and reuses it at every
application of the weight-tied map; Bai, Kolter & Koltun 2019 ("Deep equilibrium models", §5) use it
for DEQs, with one mask per forward solve.

The mask is a (non-persistent) buffer of the module, so ``deqdiff.DEQ`` hands it to the engine as an
explicit tensor like any other buffer: the forward solve and the derivative solves of that step see
the same map ``f(z, x; θ, mask)``, which is an ordinary deterministic function, and every derivative
is exact for that mask.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["VariationalDropout", "dropout_modules", "reset_dropout_masks"]


class VariationalDropout(nn.Module):
    """Multiply by a fixed mask ``m / (1 − p)``, ``m ~ Bernoulli(1 − p)``, in training mode.

    Args:
        p: drop probability in [0, 1).
        shared_dims: input dimensions over which one mask entry is shared (the mask has size 1
            there). ``()`` (default): one entry per element of the input. ``(2, 3)`` on
            ``(B, C, H, W)`` states: one entry per sample and channel, as in the DEQ and MDEQ
            reference code (Bai et al. 2019, 2020).

    The mask is drawn lazily, at the first call after :meth:`reset_mask` (or when the input's
    shape changes), from the global torch generator, and kept in the buffer ``mask`` until the next
    :meth:`reset_mask`. ``deqdiff.DEQ.forward`` resets and draws it before each forward solve, so
    one solve — and the derivative solves that follow it — use one mask. In eval mode, or with
    ``p = 0``, the module is the identity. Input and output shapes are equal.

    Raises:
        ValueError: ``p`` outside [0, 1) or a shared dimension outside the input's dimensions.
    """

    mask: Tensor | None

    def __init__(self, p: float = 0.1, *, shared_dims: Sequence[int] = ()):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"VariationalDropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_dims = tuple(int(d) for d in shared_dims)
        # non-persistent: a mask is per solve, not part of the model's state
        self.register_buffer("mask", None, persistent=False)

    def reset_mask(self) -> None:
        """Forget the current mask; the next training-mode call draws a new one."""
        self.mask = None

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        shape = list(x.shape)
        for d in self.shared_dims:
            if not -x.ndim <= d < x.ndim:
                raise ValueError(f"VariationalDropout: shared dimension {d} is outside an input of shape {tuple(x.shape)}")
            shape[d] = 1
        return tuple(shape)

    def sample_mask(self, x: Tensor) -> Tensor:
        """Draw and keep a new mask for inputs shaped like ``x``; returns it."""
        keep = 1.0 - self.p
        self.mask = torch.empty(self._mask_shape(x), dtype=x.dtype, device=x.device).bernoulli_(keep) / keep
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = self.mask
        if mask is None or mask.ndim != x.ndim or any(
                m not in (1, n) for m, n in zip(mask.shape, x.shape)) or mask.shape != self._mask_shape(x):
            mask = self.sample_mask(x)
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        shared = f", shared_dims={self.shared_dims}" if self.shared_dims else ""
        return f"p={self.p}{shared}"


def dropout_modules(module: nn.Module) -> Iterator[VariationalDropout]:
    """The :class:`VariationalDropout` modules inside ``module`` (itself included)."""
    return (m for m in module.modules() if isinstance(m, VariationalDropout))


def reset_dropout_masks(module: nn.Module) -> bool:
    """Reset every variational dropout mask inside ``module``; return whether any of them is
    active (training mode and ``p > 0``), i.e. whether a new mask must be drawn."""
    active = False
    for m in dropout_modules(module):
        m.reset_mask()
        active = active or (m.training and m.p > 0.0)
    return active
