"""The flow map's exact Taylor skip, the spectral-norm contraction and the weighted residual."""

from __future__ import annotations

import pytest
import torch

from deqdiff.physics.losses import PhysicsLoss, output_gradient
from deqdiff.physics.models import PIDEQ, FlowMap, TanhCell
from deqdiff.physics.problems import van_der_pol
from deqdiff.physics.vdp import VdPConfig


def _flow_map(order, seed=0):
    torch.manual_seed(seed)
    core = PIDEQ(4, 2, 6, rho=0.3, tol=1e-13, max_iter=300).double()
    with torch.no_grad():  # a core that is far from 0, so a wrong power of Δ would show
        core.C.bias.normal_()
        core.D.weight.normal_()
    return FlowMap(core, 2, 1, horizon=0.1, state_scale=(2.0, 3.0), rhs=van_der_pol, order=order)


def _inputs(n=6, dt=0.0):
    gen = torch.Generator().manual_seed(3)
    return torch.cat([torch.full((n, 1), dt), torch.randn(n, 2, generator=gen) * 1.5,
                      torch.full((n, 1), 1.3)], 1).double()


def _vdp_second_derivative(y0, mu):
    """ÿ = (∂F/∂y)F for Van der Pol, written out by hand (independent of torch.func)."""
    y1, y2 = y0[:, 0], y0[:, 1]
    f1, f2 = y2, mu * (1 - y1**2) * y2 - y1
    j21, j22 = -2 * mu * y1 * y2 - 1, mu * (1 - y1**2)
    return torch.stack([f2, j21 * f1 + j22 * f2], 1)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_skip_is_exact_at_zero(order):
    fm = _flow_map(order)
    x = _inputs().requires_grad_()
    y = fm(x)
    assert torch.equal(y, x[:, 1:3])  # y(0) = y0 whatever the core
    dy = output_gradient(y, x, 0)
    d2y = torch.stack([torch.autograd.grad(dy[:, i].sum(), x, create_graph=True)[0][:, 0] for i in range(2)], 1)
    f = van_der_pol(x[:, 0], x[:, 1:3], x[:, 3])
    f2 = _vdp_second_derivative(x[:, 1:3], x[:, 3])
    if order >= 1:
        torch.testing.assert_close(dy, f, atol=1e-12, rtol=0)
    else:
        assert (dy - f).abs().max() > 1e-3  # order 0: the slope is the core's, not F
    if order == 2:
        torch.testing.assert_close(d2y, f2, atol=1e-10, rtol=0)
    else:
        assert (d2y - f2).abs().max() > 1e-3


def test_taylor_skip_matches_the_flow_to_third_order():
    """With the core ≡ 0 (skip alone), the local error at Δ is O(Δ³): halving Δ divides it by ≈ 8."""
    from deqdiff.physics.problems import reference_flow

    fm = _flow_map(2)
    y0 = _inputs()[:, 1:3].numpy()
    errs = []
    for dt in (0.02, 0.01):
        x = _inputs(dt=dt)
        ref = reference_flow(y0, [0.0, dt], 1.3)[:, -1]
        errs.append(float((fm.skip(x) - torch.as_tensor(ref)).abs().max()))
    assert 6 < errs[0] / errs[1] < 10


def test_taylor_skip_needs_rhs_and_a_known_order():
    core = PIDEQ(4, 2, 3)
    with pytest.raises(ValueError, match="needs the right-hand side"):
        FlowMap(core, 2, 1, order=2)
    with pytest.raises(ValueError, match="order must be"):
        FlowMap(core, 2, 1, rhs=van_der_pol, order=3)
    with pytest.raises(ValueError, match="taylor"):
        VdPConfig.for_setup("conditioned", taylor=3)


def test_spectral_norm_bounds_the_top_singular_value():
    torch.manual_seed(0)
    cell = TanhCell(12, 3, spectral_norm=0.9).double()
    with torch.no_grad():
        cell.A.mul_(5.0)  # far outside the bound
    cell.power_iteration(100)
    sigma = torch.linalg.matrix_norm(cell.A.detach(), ord=2)
    torch.testing.assert_close(cell.sigma().detach(), sigma, rtol=1e-8, atol=0)
    assert torch.linalg.matrix_norm(cell.weight().detach(), ord=2) <= 0.9 * (1 + 1e-8)
    # unlike the Frobenius bound, the other singular values are not shrunk more than the top one
    fro = TanhCell(12, 3, max_norm=0.9).double()
    fro.A.data.copy_(cell.A.data)
    s_spec = torch.linalg.svdvals(cell.weight().detach())
    s_fro = torch.linalg.svdvals(fro.weight().detach())
    assert (s_spec > s_fro).all()
    with pytest.raises(ValueError, match="at most one"):
        TanhCell(4, 1, max_norm=0.5, spectral_norm=0.5)
    with pytest.raises(ValueError, match="spectral_norm must be"):
        TanhCell(4, 1, spectral_norm=1.5)


def test_spectral_norm_updates_only_in_training_and_keeps_one_A_per_step():
    torch.manual_seed(1)
    m = PIDEQ(2, 2, 8, spectral_norm=0.95, tol=1e-10).double()
    with torch.no_grad():
        m.cell.A.mul_(4.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    u0 = m.cell._u.clone()
    m.eval()
    m(x)
    assert torch.equal(m.cell._u, u0)  # evaluation never changes the model
    m.train()
    y = m(x)
    assert not torch.equal(m.cell._u, u0)
    w = m.cell.weight().detach()
    y.sum().backward()  # the backward solves see the same A as the forward solve did
    assert torch.equal(m.cell.weight().detach(), w)
    assert m.deq.last_info.forward.converged.all()


def test_residual_weight_scales_each_sample():
    fm = _flow_map(2)
    x = _inputs(n=5, dt=0.05)
    x[:, 0] = torch.tensor([0.01, 0.03, 0.05, 0.07, 0.1], dtype=torch.float64)
    w = lambda x: 1.0 / x[:, 0] ** 2  # noqa: E731
    plain = PhysicsLoss(van_der_pol, rhs_args=lambda x: x[:, 3], ic_weight=0)
    weighted = PhysicsLoss(van_der_pol, rhs_args=lambda x: x[:, 3], ic_weight=0, residual_weight=w)
    from deqdiff.physics.losses import ode_residual

    r, _ = ode_residual(fm, x, van_der_pol, rhs_args=lambda x: x[:, 3])
    torch.testing.assert_close(plain(fm, x).total, (r * r).mean())
    torch.testing.assert_close(weighted(fm, x).total, ((r / x[:, :1] ** 2) ** 2).mean())


def test_taylor_features_keep_the_skip_exact_and_check_the_core_width():
    torch.manual_seed(4)
    core = PIDEQ(8, 2, 6, rho=0.3, tol=1e-13, max_iter=300).double()
    fm = FlowMap(core, 2, 1, horizon=0.1, state_scale=(2.0, 3.0), rhs=van_der_pol, order=2, taylor_features=True)
    x = _inputs().requires_grad_()
    phi = fm.features(x)
    assert phi.shape == (6, 8)
    torch.testing.assert_close(phi[:, 4:6], torch.asinh(van_der_pol(0, x[:, 1:3], x[:, 3]) / fm.state_scale))
    y = fm(x)
    dy = output_gradient(y, x, 0)
    torch.testing.assert_close(dy, van_der_pol(0, x[:, 1:3], x[:, 3]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="core must take 8 inputs"):
        FlowMap(PIDEQ(4, 2, 3), 2, 1, rhs=van_der_pol, order=2, taylor_features=True)


def test_spectral_norm_survives_two_training_passes_in_one_loss():
    """A physics loss calls the model twice per step (collocation points, then the initial
    condition); the second power iteration must not invalidate the first pass's graph."""
    torch.manual_seed(2)
    m = PIDEQ(1, 2, 8, spectral_norm=0.95, tol=1e-10).double().train()
    loss = PhysicsLoss(van_der_pol, physics_weight=0.1)
    ic = (torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[0.0, 0.1]], dtype=torch.float64))
    out = loss(m, torch.rand(6, 1, dtype=torch.float64), ic=ic)
    out.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
