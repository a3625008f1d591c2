"""FNO-DEQ and the explicit FNO: the spectral convolution against explicit DFT sums, implicit
first and second derivatives through rfft2/irfft2 against gradcheck/gradgradcheck and unrolled
autodiff (float64), batch independence, parameter equality, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from deqdiff.models.fno import FNODEQ, FNOExplicit, SpectralConv2d, count_parameters, spectral_conv2d


def dense_spectral_conv(x: np.ndarray, weight: np.ndarray, m1: int, m2: int) -> np.ndarray:
    """Reference by explicit DFT sums: out[o,p,q] = 1/(HW) Σ_{k₁ ∈ K₁, k₂ < m2} c_{k₂}
    Re(Z[o,k₁,k₂] e^{2πi(k₁p/H + k₂q/W)}), Z = Σ_i X̂[i] w[i,o], c = 1 at k₂ = 0, else 2 (the
    Hermitian partner of each retained k₂ > 0)."""
    B, C, H, W = x.shape
    w = weight[..., 0] + 1j * weight[..., 1]
    p, q = np.arange(H), np.arange(W)
    out = np.zeros((B, w.shape[2], H, W))
    for block, ks in ((0, range(m1)), (1, range(H - m1, H))):
        for j1, k1 in enumerate(ks):
            for k2 in range(m2):
                wave = np.exp(2j * np.pi * (k1 * p[:, None] / H + k2 * q[None, :] / W))  # (H, W)
                xh = (x * np.conj(wave)).sum(axis=(2, 3))  # (B, C)
                z = xh @ w[block, :, :, j1, k2]  # (B, C_out)
                c = 1.0 if k2 == 0 else 2.0
                out += c * np.real(z[:, :, None, None] * wave) / (H * W)
    return out


@pytest.mark.parametrize("shape,modes", [((6, 8), (2, 3)), ((7, 7), (3, 4)), ((8, 5), (4, 1))])
def test_spectral_conv_matches_explicit_dft(shape, modes):
    g = torch.Generator().manual_seed(0)
    H, W = shape
    x = torch.randn(2, 3, H, W, generator=g)
    w = torch.randn(2, 3, 4, *modes, 2, generator=g)
    got = spectral_conv2d(x, w, *modes)
    ref = dense_spectral_conv(x.numpy(), w.numpy(), *modes)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-11, atol=1e-12)


def test_spectral_conv_refuses_modes_beyond_the_grid():
    x = torch.zeros(1, 2, 6, 6)
    with pytest.raises(ValueError, match="modes"):
        spectral_conv2d(x, torch.zeros(2, 2, 2, 4, 2, 2), 4, 2)
    with pytest.raises(ValueError, match="modes"):
        FNODEQ(8, width=2, modes=5)
    with pytest.raises(ValueError, match="modes1"):
        SpectralConv2d(2, 2, 0, 2)


def tiny(seed: int = 0, **kw) -> tuple[FNODEQ, FNOExplicit]:
    """A tiny FNO-DEQ (strongly contractive cell) and the weight-tied explicit FNO with the same
    parameters, applied enough times that unrolling converges to the fixed point in float64."""
    opts = dict(width=3, modes=2, projection=4, cell_scale=0.3)
    torch.manual_seed(seed)
    deq = FNODEQ(6, tol=1e-13, max_iter=200, backward_tol=1e-13, **opts, **kw)
    torch.manual_seed(seed)
    unrolled = FNOExplicit(6, k=60, tied=True, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial normalization so every buffer enters the maps
        deq.set_normalization(3 + 9 * torch.rand(20, 6, 6, generator=g), torch.rand(20, 6, 6, generator=g))
    unrolled.load_state_dict({k.replace("deq.cell.", "core.cell."): v for k, v in deq.state_dict().items()})
    return deq, unrolled


def test_explicit_tied_has_the_deq_parameters():
    deq, unrolled = tiny()
    assert count_parameters(deq) == count_parameters(unrolled)
    untied = FNOExplicit(6, k=4, tied=False, width=3, modes=2, projection=4)
    cell = count_parameters(deq.cell)
    assert count_parameters(untied) == count_parameters(deq) + 3 * cell


def test_fixed_point_equals_unrolled_limit():
    deq, unrolled = tiny()
    a = 3 + 9 * torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(5))
    u = deq(a)
    assert bool(deq.deq.last_info.forward.converged.all())
    torch.testing.assert_close(u, unrolled(a), rtol=1e-11, atol=1e-13)
    assert torch.all(u[:, 0] == 0) and torch.all(u[:, :, -1] == 0)  # zero Dirichlet boundary


def _checked_map():
    """u's two linear functionals as a function of a patch of the input field and the
    (k₁, k₂) = (0, 0) spectral weights (a subset keeps finite differences affordable)."""
    deq, _ = tiny()
    g = torch.Generator().manual_seed(7)
    base = 3 + 9 * torch.rand(1, 6, 6, generator=g)
    full = deq.cell.spectral.weight.detach()
    patch = base[:, 2:4, 2:4].clone().requires_grad_()
    w = full[0, 0, :, 0, 0].clone().requires_grad_()  # (C_out, 2): input channel 0 → every channel
    readout = torch.randn(2, 6, 6, generator=g)  # two linear functionals of u

    def fn(patch, w):
        a, weight = base.clone(), full.clone()
        a[:, 2:4, 2:4] = patch
        weight[0, 0, :, 0, 0] = w
        u = functional_call(deq, {"deq.cell.spectral.weight": weight}, (a,))
        return (u * readout).sum((1, 2))

    return fn, (patch, w)


def test_gradcheck_through_rfft():
    fn, inputs = _checked_map()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_gradgradcheck_through_rfft():
    fn, inputs = _checked_map()
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_first_and_second_derivatives_match_unrolled_autodiff():
    deq, unrolled = tiny()
    a = 3 + 9 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(8))
    target = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(9))
    grads = {}
    for key, model, name in (("deq", deq, "deq.cell.spectral.weight"), ("unrolled", unrolled, "core.cell.spectral.weight")):
        w = dict(model.named_parameters())[name]
        loss = (model(a) - target).square().sum()
        g1, = torch.autograd.grad(loss, w, create_graph=True)
        v = torch.linspace(-1, 1, w.numel()).reshape(w.shape)
        g2, = torch.autograd.grad((g1 * v).sum(), w)  # Hessian-vector product
        grads[key] = (g1.detach(), g2)
    for i in range(2):
        torch.testing.assert_close(grads["deq"][i], grads["unrolled"][i], rtol=1e-8, atol=1e-12)


def test_forward_mode_through_the_cell_matches_unrolled():
    deq, unrolled = tiny()
    a = 3 + 9 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(10))
    da = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(11))
    _, t_deq = torch.func.jvp(lambda x: deq(x), (a,), (da,))
    _, t_unr = torch.func.jvp(lambda x: unrolled(x), (a,), (da,))
    torch.testing.assert_close(t_deq, t_unr, rtol=1e-9, atol=1e-12)


def test_batch_independence():
    deq, _ = tiny()
    deq.deq.solver_options.update(tol=1e-10)
    a = 3 + 9 * torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(12))
    together = deq(a)
    for i in range(4):
        torch.testing.assert_close(deq(a[i:i + 1])[0], together[i], rtol=1e-9, atol=1e-12)
    # a perturbed sample leaves the others unchanged
    b = a.clone()
    b[2] += 1.0
    other = deq(b)
    torch.testing.assert_close(other[[0, 1, 3]], together[[0, 1, 3]], rtol=1e-9, atol=1e-12)


def test_input_shape_checked_and_channel_dim_accepted():
    deq, _ = tiny()
    a = 3 + 9 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(deq(a.unsqueeze(1)), deq(a))
    with pytest.raises(ValueError, match=r"\(B, 6, 6\)"):
        deq(torch.ones(2, 7, 6))
    with pytest.raises(ValueError, match="k"):
        FNOExplicit(6, k=0, width=3, modes=2)


def test_nonconvergence_is_reported_with_its_residual():
    deq, _ = tiny()
    a = 3 + 9 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(14))
    with pytest.warns(Warning, match="residual"):
        deq(a, max_iter=1, tol=1e-14)
    assert not bool(deq.deq.last_info.forward.converged.any())
