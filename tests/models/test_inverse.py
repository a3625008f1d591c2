"""Inverse-problem DEQ: operators and adjoints, the cell against hand computation and dense
float64 references, derivatives of every order against unrolled autodiff, every solver, batch
independence, and the derivatives/analysis API on a tiny configuration."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from deqdiff.models.inverse import (Blur, GaussianBlur, Identity, InverseCell, InverseDEQ, InverseUnrolled,
                                    ResidualDenoiser, cell_lipschitz, gaussian_kernel, psnr, unrolled)
from tests.conftest import rel_err


def _inner(a, b):
    return float((a * b).sum())


@pytest.mark.parametrize("op", [Identity(), Blur(torch.randn(3, 3, generator=torch.Generator().manual_seed(0))),
                                GaussianBlur(1.3, 5)])
def test_adjoint_identity(op):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 7, 5, generator=g)  # several channels, a non-square image
    y = torch.randn(3, 2, 7, 5, generator=g)
    assert _inner(op(x), y) == pytest.approx(_inner(x, op.adjoint(y)), rel=1e-12, abs=1e-12)
    M = op.matrix((1, 4, 3))
    Mt = op.adjoint(torch.eye(12).reshape(12, 1, 4, 3)).reshape(12, 12).T
    torch.testing.assert_close(Mt, M.T, rtol=0, atol=1e-14)
    assert torch.linalg.matrix_norm(M, 2) <= op.norm_bound() + 1e-12


def test_blur_is_a_true_convolution_by_hand():
    k = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    A = Blur(k)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0  # a centred impulse returns the kernel itself (not flipped)
    torch.testing.assert_close(A(x)[0, 0], k)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = 1.0  # (k ∗ δ₀₀)[i, j] = k[i + 1, j + 1], zero padding cuts the rest
    expected = torch.tensor([[5.0, 6.0, 0.0], [8.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(A(x)[0, 0], expected)
    torch.testing.assert_close(A.kernel, k)


def test_gaussian_kernel_and_bad_arguments():
    k = gaussian_kernel(5, 1.0)
    assert k.shape == (5, 5) and float(k.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert float(k[2, 2]) / float(k[2, 3]) == pytest.approx(torch.e ** 0.5)
    for size, sigma in ((4, 1.0), (0, 1.0), (5, 0.0), (5, float("nan"))):
        with pytest.raises(ValueError):
            gaussian_kernel(size, sigma)
    with pytest.raises(ValueError, match="odd"):
        Blur(torch.ones(2, 2))
    with pytest.raises(ValueError, match="form"):
        InverseCell(Identity(), ResidualDenoiser(1, 2), form="admm")
    with pytest.raises(ValueError, match="step size"):
        InverseCell(Identity(), ResidualDenoiser(1, 2), step_size=0.0)
    with pytest.raises(ValueError, match="Tikhonov"):
        InverseCell(Identity(), ResidualDenoiser(1, 2), tikhonov=-1.0)


def _constant_denoiser(c: float) -> ResidualDenoiser:
    """ε(u) = c everywhere: the last convolution's weights zero, its bias c."""
    d = ResidualDenoiser(1, 2)
    with torch.no_grad():
        d.conv3.weight.zero_()
        d.conv3.bias.fill_(c)
    return d


@pytest.mark.parametrize("form", ["prox", "grad"])
def test_cell_and_fixed_point_by_hand(form):
    eta, mu, c = 0.5, 0.1, 0.05
    cell = InverseCell(Identity(), _constant_denoiser(c), step_size=eta, form=form, tikhonov=mu)
    z, y = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 1.0)
    # prox: u = 2 − 0.5·((2 − 1) + 0.1·2) = 1.4, R(u) = 1.4 − 0.05; grad: 1.4 − 0.5·0.05
    expected = 1.35 if form == "prox" else 1.375
    torch.testing.assert_close(cell(z, y), torch.full_like(z, expected))
    # fixed points: prox z = (y − c/η)/(1 + μ), grad z = (y − c)/(1 + μ)
    z_star = (1.0 - (c / eta if form == "prox" else c)) / (1 + mu)
    deq = InverseDEQ(Identity(), hidden=2, step_size=eta, form=form, tikhonov=mu, tol=1e-12, max_iter=100)
    deq.deq.cell = cell
    torch.testing.assert_close(deq(y), torch.full_like(y, z_star), rtol=1e-10, atol=1e-10)


def test_fixed_point_against_dense_regularized_least_squares():
    """With ε_θ = 0 the DEQ solves min ½‖Az − y‖² + (μ/2)‖z‖²: z* = (AᵀA + μI)⁻¹ Aᵀy."""
    g = torch.Generator().manual_seed(2)
    A = GaussianBlur(1.0, 3)
    mu = 0.3
    model = InverseDEQ(A, hidden=2, tikhonov=mu, tol=1e-12, max_iter=300, solver="anderson")
    model.deq.cell.denoiser = _constant_denoiser(0.0)
    y = torch.randn(2, 1, 4, 5, generator=g)
    M = A.matrix((1, 4, 5))
    ref = torch.linalg.solve(M.T @ M + mu * torch.eye(20), (y.reshape(2, 20) @ M).T).T.reshape(2, 1, 4, 5)
    assert rel_err(model(y), ref) < 1e-10
    torch.testing.assert_close(InverseCell(A, _constant_denoiser(0.0)).init_state(y), A.adjoint(y))


def _tiny(form: str = "prox", **solver) -> InverseDEQ:
    """A strongly contractive tiny model (4×4 images, 2 hidden channels, μ = 1: the data step
    contracts by 1 − ημ = 0.5), float64; derivative solves dense (16 unknowns per sample)."""
    torch.manual_seed(0)
    m = InverseDEQ(GaussianBlur(0.8, 3), hidden=2, form=form, tikhonov=1.0, init_std=0.1,
                   **{"tol": 1e-12, "max_iter": 300, "backward_solver": "dense", **solver})
    with torch.no_grad():
        for conv in (m.cell.denoiser.conv1, m.cell.denoiser.conv2):
            conv.weight.mul_(0.5)
    return m


def _unrolled_ref(model: InverseDEQ, iters: int = 80) -> InverseUnrolled:
    ref = InverseUnrolled(model.cell.operator, k=iters, hidden=2)
    ref.core.cell = model.cell  # the same parameters
    return ref


def _data(n: int = 3):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 4, 4, generator=g), torch.rand(n, 1, 4, 4, generator=g)


@pytest.mark.parametrize("form", ["prox", "grad"])
def test_gradients_match_unrolled_float64(form):
    model = _tiny(form)
    y, x = _data()
    lip = cell_lipschitz(model.cell, model(y), y)
    assert float(lip.max()) < 0.7  # contractive: 80 unrolled steps leave < 0.7⁸⁰ ≈ 4e-13 of the start
    params = list(model.parameters())
    loss = (model(y) - x).pow(2).sum()
    g_deq = torch.autograd.grad(loss, params)
    loss_ref = (_unrolled_ref(model)(y) - x).pow(2).sum()
    g_ref = torch.autograd.grad(loss_ref, params)
    for a, b in zip(g_deq, g_ref):
        assert rel_err(a, b) < 1e-8
    # the reconstruction's derivative w.r.t. the measurement, too
    yy = y.clone().requires_grad_()
    (gy,) = torch.autograd.grad((model(yy) - x).pow(2).sum(), yy)
    (gy_ref,) = torch.autograd.grad((_unrolled_ref(model)(yy) - x).pow(2).sum(), yy)
    assert rel_err(gy, gy_ref) < 1e-8


def test_gradcheck_and_gradgradcheck():
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    y, _ = _data(1)
    w = dict(model.named_parameters())["deq.cell.denoiser.conv1.bias"].detach().clone().requires_grad_()
    y = y.clone().requires_grad_()

    def recon(w, y):
        p = {n: t for n, t in model.named_parameters()}
        p["deq.cell.denoiser.conv1.bias"] = w
        return functional_call(model, p, (y,)).sin().sum(dim=(1, 2, 3))

    assert names
    assert torch.autograd.gradcheck(recon, (w, y), eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradgradcheck(recon, (w, y), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_hessian_vector_product_matches_unrolled():
    model = _tiny()
    y, x = _data(2)
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def hvp(net):
        g = torch.autograd.grad((net(y) - x).pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)

    for a, b in zip(hvp(model), hvp(_unrolled_ref(model))):
        assert rel_err(a, b) < 1e-7


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "newton_krylov"])
def test_every_forward_solver(solver):
    model = _tiny(solver=solver, tol=1e-10)
    y, x = _data()
    z = model(y)
    info = model.deq.last_info.forward
    assert bool(info.converged.all()) and float(info.rel_residual.max()) <= 1e-10
    ref = _unrolled_ref(model)
    assert rel_err(z, ref(y)) < 1e-8
    params = list(model.parameters())
    g = torch.autograd.grad((z - x).pow(2).sum(), params)
    g_ref = torch.autograd.grad((ref(y) - x).pow(2).sum(), params)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(g, g_ref))


def test_batch_independence():
    model = _tiny()
    y, _ = _data(4)
    z = model(y)
    for i in range(4):
        torch.testing.assert_close(model(y[i:i + 1]), z[i:i + 1], rtol=1e-9, atol=1e-10)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(y[perm]), z[perm], rtol=1e-9, atol=1e-10)


def test_unrolled_model_and_test_time_iterations():
    model = _tiny()
    y, _ = _data(2)
    net = InverseUnrolled(model.cell.operator, k=3, hidden=2)
    net.core.cell = model.cell
    z1 = model.cell(model.cell.init_state(y), y)
    torch.testing.assert_close(net(y, iterations=1), z1)
    torch.testing.assert_close(net(y), unrolled(model.cell, y, 3))
    traj = unrolled(model.cell, y, 3, trajectory=True)
    assert len(traj) == 4 and torch.equal(traj[0], model.cell.init_state(y))
    with pytest.raises(ValueError):
        unrolled(model.cell, y, -1)


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    est = x + torch.tensor([0.1, 0.01])[:, None, None, None]
    torch.testing.assert_close(psnr(est, x), torch.tensor([20.0, 40.0]))


def _cell_loss(model: InverseDEQ, y, x):
    """The unrolled reference loss as a function of the flat cell parameters, and those."""
    names = [n for n, _ in model.cell.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.cell.named_parameters()}
    sizes = [t.numel() for t in theta.values()]
    ref = _unrolled_ref(model)

    def loss_flat(v):
        parts = {n: c.view_as(theta[n]) for c, n in zip(v.split(sizes), names)}
        return _mse(_apply_unrolled(ref, parts, y), x)

    return loss_flat, torch.cat([t.reshape(-1) for t in theta.values()])


def _mse(out, target):
    return (out - target).pow(2).sum()


def test_loss_hessian_spectrum_and_ntk_on_a_tiny_model():
    """The analysis tools apply: a loss-Hessian product (two implicit solves) against double
    backpropagation through the unrolled network, the top eigenvalue by Lanczos against the
    dense Hessian, and the empirical NTK against the unrolled network's per-sample Jacobians."""
    from deqdiff.analysis import deq_loss_hessian, empirical_ntk, hessian_spectrum

    model = _tiny()
    y, x = _data(2)
    loss_flat, flat = _cell_loss(model, y, x)
    v = torch.randn(flat.shape, generator=torch.Generator().manual_seed(5))
    _, hv_ref = torch.autograd.functional.hvp(loss_flat, flat, v)
    H = deq_loss_hessian(model, _mse, y, x)
    assert rel_err(H.flat_vp(v), hv_ref) < 1e-8
    top = float(torch.linalg.eigvalsh(H.dense())[-1])
    spec = hessian_spectrum(model, _mse, y, x, k=1, terms=("total",), num_iters=20)
    assert spec["dim"] == flat.numel() and spec["total"][0] == pytest.approx(top, rel=1e-8)

    K = empirical_ntk(model, y, tol=1e-12)
    K_ref = empirical_ntk(_unrolled_ref(model), y)
    assert K.shape == (2 * 16, 2 * 16) and rel_err(K, K_ref) < 1e-8


@pytest.mark.slow
def test_dense_loss_hessian_matches_unrolled():
    from deqdiff.analysis import deq_loss_hessian

    model = _tiny()
    y, x = _data(2)
    loss_flat, flat = _cell_loss(model, y, x)
    H_ref = torch.autograd.functional.hessian(loss_flat, flat)
    assert rel_err(deq_loss_hessian(model, _mse, y, x).dense(), H_ref) < 1e-8


def _apply_unrolled(ref: InverseUnrolled, params: dict, y):
    cell = ref.core.cell
    z = cell.init_state(y)
    for _ in range(ref.k):
        z = functional_call(cell, params, (z, y))
    return z
