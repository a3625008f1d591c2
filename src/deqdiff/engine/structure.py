"""Which rows of a fixed-point problem are independent samples, found by probing ``f``.

Users write ``fixed_point(f, zeros(N, n), W, x)`` for N samples without saying that the
samples do not interact. When they do not, ``∂f/∂z`` is block diagonal and every sample
can converge, freeze and be differentiated on its own (per-sample stopping, the rows still
running evaluated alone, per-sample dense or Richardson derivative solves): much cheaper
than one N·n-unknown problem. The probe, at a random point ``z_p`` near ``f(z0)``:

* for r = 0 and r = N−1 separately, a pullback of a random cotangent supported on row r:
  with independent rows, ``∂f/∂z`` has exactly zero rows elsewhere, and so has ``∂f/∂p`` for
  a per-sample parameter ``p`` (dim 0 of size N); a shared parameter's gradient is not confined;
* a perturbation of row r of ``z_p``: the other rows of ``f`` must not change at all.

Dependence in either direction from the first and last sample (a batch mean or norm,
attention, causal or anti-causal mixing along dim 0) shows up as a nonzero; only exact
zeros count, so a false "independent" needs coupling that vanishes identically at a
random point. Inside ``torch.func`` transforms that keep shapes (``grad``, ``jvp``, ``vjp``, the
forward-mode pattern ``jvp(model, (t,), (1,))``) the probe runs on the plain values under the
wrappers, outside the transforms. Anything undecidable (``vmap``'s batched values, a map that
fails outside the transforms, a per-sample parameter that is not floating point) keeps the
conservative reading.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from .validation import all_finite, is_transformed, unwrapped

__all__ = ["infer_rows"]


def _magnitude(t: Tensor) -> float:
    """max |t| (no squares: problems of any representable scale), or 1 when 0/non-finite."""
    m = float(t.detach().abs().amax()) if t.numel() else 0.0
    return m if 0 < m < float("inf") else 1.0


def _probe_point(z0: Tensor, fz0: Tensor | None, gen: torch.Generator) -> Tensor:
    base = z0 if fz0 is None else fz0
    scale = _magnitude(base)
    noise = torch.randn(z0.shape, generator=gen, dtype=torch.float64).to(dtype=z0.dtype, device=z0.device)
    return (base.detach() + 0.5 * scale * noise).detach()


def infer_rows(f: Callable[..., Tensor], z0: Tensor, params: Sequence[Tensor], fz0: Tensor | None,
               want_batch: bool) -> tuple[int, tuple[int, ...] | None]:
    """``(batch_ndim, row_params)`` for ``fixed_point(f, z0, *params)`` (module docstring).

    ``want_batch``: decide whether dim 0 indexes independent samples (else it is taken as
    given, ``batch_ndim = 1``). ``row_params`` are the params whose dim 0 indexes those
    samples; ``None`` when some cannot be classified (the forward solve then evaluates
    all rows each iteration)."""
    S = z0.shape[0] if z0.ndim else 0
    conservative = (0 if want_batch else 1), None
    if S < 2 or z0.ndim < 2:
        return conservative
    if torch._C._functorch.maybe_current_level() is not None or any(map(is_transformed, (z0, *params))):
        values = [unwrapped(t)[0] for t in (z0, *params, *([] if fz0 is None else [fz0]))]
        if any(v is None for v in values):
            return conservative
        try:
            with temporarily_clear_interpreter_stack():
                return _probe(f, values[0], values[1 : 1 + len(params)], None if fz0 is None else values[-1],
                              want_batch)
        except RuntimeError:  # f holds values of the transforms it was called under
            return conservative
    return _probe(f, z0, params, fz0, want_batch)


def _probe(f: Callable[..., Tensor], z0: Tensor, params: Sequence[Tensor], fz0: Tensor | None,
           want_batch: bool) -> tuple[int, tuple[int, ...] | None]:
    S = z0.shape[0]
    gen = torch.Generator().manual_seed(0x5EED)
    zp = _probe_point(z0, fz0, gen)
    diff = [i for i, p in enumerate(params) if p.is_floating_point()]
    leaves = [params[i].detach().requires_grad_() for i in diff]
    args = [p.detach() for p in params]
    for i, leaf in zip(diff, leaves):
        args[i] = leaf
    z_leaf = zp.clone().requires_grad_()
    with torch.enable_grad():
        out = f(z_leaf, *args)
    if not all_finite(out):
        return (0 if want_batch else 1), None
    confined = [True] * len(params)  # per param: gradients stay in the probed row
    independent = True
    for r in (0, S - 1):  # each end separately: with S = 2 the two ends are all the rows
        others = torch.ones(S, dtype=torch.bool, device=z0.device)
        others[r] = False
        u = torch.zeros_like(out)
        u[r] = torch.randn(out[r].shape, generator=gen, dtype=torch.float64).to(out)
        grads = torch.autograd.grad(out, [z_leaf, *leaves], u, allow_unused=True, retain_graph=True)
        if not all_finite(*(g for g in grads if g is not None)):
            return (0 if want_batch else 1), None  # an overflowing probe decides nothing
        for k, i in enumerate(diff):
            g = grads[1 + k]
            if g is not None and params[i].ndim and params[i].shape[0] == S:
                confined[i] = confined[i] and bool((g[others] == 0).all())
        if want_batch:
            bump = torch.zeros_like(zp)
            bump[r] = torch.randn(zp[r].shape, generator=gen, dtype=torch.float64).to(zp) * _magnitude(zp)
            with torch.no_grad():
                moved = f(zp + bump, *args)
            independent = (independent and bool((grads[0][others] == 0).all())
                           and bool((moved[others] == out.detach()[others]).all()))
    del out
    if not independent:
        return 0, None
    rows = []
    for i, p in enumerate(params):
        if p.ndim == 0 or p.shape[0] != S:
            continue
        if not p.is_floating_point():
            return 1, None  # cannot tell whether f uses it per sample: no row subsets
        if confined[i]:
            rows.append(i)
    return 1, tuple(rows)
