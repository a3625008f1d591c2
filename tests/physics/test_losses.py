"""The physics loss and its weight gradient (implicit, every derivative a solve) against
unrolled autodiff on a small strongly contractive PIDEQ in float64."""

from __future__ import annotations

import pytest
import torch

from deqdiff.physics.losses import PhysicsLoss, hutchinson_frobenius, output_gradient, output_tangent
from deqdiff.physics.models import PIDEQ, FlowMap
from deqdiff.physics.problems import van_der_pol


def _model(mode="implicit", in_features=1, width=6, seed=0):
    torch.manual_seed(seed)
    mode, _, unrolled_solver = mode.partition("-")  # "unrolled-anderson": the PIDEQ paper's loop
    m = PIDEQ(in_features, 2, width, mode=mode, rho=0.3, tol=1e-13, max_iter=300,
              unrolled_solver=unrolled_solver or "fixed_point").double()
    with torch.no_grad():
        m.D.weight.normal_()  # exercise the skip term too
        m.cell.b.normal_(std=0.5)  # z = 0 must not be a fixed point (unrolled would take 0 steps)
    return m


def _reference_loss(m, t, ic, lam, kappa):
    """Same loss written out by hand: z* by 200 plain iterations recorded by autograd."""
    cell = m.cell

    def forward(x):
        z = x.new_zeros(x.shape[0], m.width)
        for _ in range(200):
            z = cell(z, x)
        return m.C(z) + m.D(x), z

    x = t.detach().requires_grad_()
    y, z = forward(x)
    dy = torch.stack([torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0][:, 0] for i in range(2)], 1)
    r = dy - van_der_pol(x[:, 0], y)
    jac = torch.sqrt(((1 - z**2) ** 2 * (cell.A**2).sum(1)).sum(1)).mean()
    y0, _ = forward(ic[0])
    return (y0 - ic[1]).pow(2).mean() + lam * r.pow(2).mean() + kappa * jac


@pytest.mark.parametrize("derivative_mode", ["forward", "reverse"])
@pytest.mark.parametrize("mode", ["implicit", "unrolled", "unrolled-anderson"])
def test_loss_and_gradient_match_unrolled_autodiff(mode, derivative_mode):
    m = _model(mode)
    t = torch.rand(7, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    ic = (torch.zeros(1, 1), torch.tensor([[0.0, 0.1]]))
    loss = PhysicsLoss(lambda t, y: van_der_pol(t, y), physics_weight=0.1, jacobian_weight=1.0,
                       derivative_mode=derivative_mode)
    out = loss(m, t, ic=ic)
    g = torch.autograd.grad(out.total, list(m.parameters()))
    ref = _reference_loss(m, t, ic, 0.1, 1.0)
    g_ref = torch.autograd.grad(ref, list(m.parameters()))
    assert abs(out.terms['total'] - float(ref.detach())) <= 1e-10 * abs(float(ref.detach()))
    for a, b in zip(g, g_ref):
        assert float((a - b).norm()) <= 1e-8 * max(float(b.norm()), 1e-3)
    assert {"physics", "ic", "jacobian", "total", "iters_mean"} <= set(out.terms)


def test_output_gradient_is_per_sample_time_derivative():
    m = _model()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None].requires_grad_()
    dy = output_gradient(m(t), t)
    h = 1e-6
    fd = (m(t.detach() + h) - m(t.detach() - h)) / (2 * h)
    assert torch.allclose(dy, fd, atol=1e-8)
    y_fwd, dy_fwd = output_tangent(m, t)
    torch.testing.assert_close(dy_fwd, dy, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(y_fwd, m(t), rtol=1e-12, atol=1e-13)


def test_physics_loss_solves_per_derivative_mode():
    """∂y/∂t by forward mode: one tangent solve for both outputs, then two solves in the
    weight gradient. Reverse mode in the time alone (one number per sample): the engine answers
    both outputs' passes from one tangent solve too. Reverse mode in a wider input: one adjoint
    per output, then their transposes and z*'s."""
    t = torch.rand(6, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    counts = {}
    for mode in ("forward", "reverse"):
        m = _model()
        loss = PhysicsLoss(lambda t, y: van_der_pol(t, y), ic_weight=0.0, derivative_mode=mode)
        total = loss(m, t).total
        torch.autograd.grad(total, list(m.parameters()))
        counts[mode] = len(m.deq.last_info.derivatives)
    assert counts == {"forward": 3, "reverse": 3}
    x = torch.cat([t, torch.ones_like(t)], 1)  # the time and a constant input column
    m = _model(in_features=2)
    loss = PhysicsLoss(lambda t, y: van_der_pol(t, y), ic_weight=0.0, derivative_mode="reverse")
    torch.autograd.grad(loss(m, x).total, list(m.parameters()))
    assert len(m.deq.last_info.derivatives) == 5
    # the initial condition joins the collocation rows: still one fixed point, three solves
    m = _model()
    ic = (torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[0.0, 0.1]], dtype=torch.float64))
    out = PhysicsLoss(lambda t, y: van_der_pol(t, y))(m, t, ic=ic)
    torch.autograd.grad(out.total, list(m.parameters()))
    assert m.deq.last_info.forward.iterations.shape == (7,) and len(m.deq.last_info.derivatives) == 3
    with pytest.raises(ValueError, match="derivative_mode"):
        PhysicsLoss(lambda t, y: y, derivative_mode="sideways")


@pytest.mark.parametrize("derivative_mode", ["forward", "reverse"])
def test_conditioned_flow_map_loss_gradient_matches_unrolled(derivative_mode):
    torch.manual_seed(1)
    core = PIDEQ(4, 2, 5, rho=0.3, tol=1e-13, max_iter=300).double()
    fm = FlowMap(core, 2, 1, horizon=0.5, state_scale=(2.0, 3.0), cond_center=1.0)
    loss = PhysicsLoss(van_der_pol, rhs_args=lambda x: x[:, 3], ic_weight=0.0, jacobian_weight=0.5,
                       derivative_mode=derivative_mode)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(6, 1, generator=gen) * 0.5, torch.randn(6, 2, generator=gen), torch.ones(6, 1)], 1)
    g = torch.autograd.grad(loss(fm, x).total, list(fm.parameters()))
    core.set_mode("unrolled")
    core.deq.solver_options.update(tol=1e-14)
    g_ref = torch.autograd.grad(loss(fm, x).total, list(fm.parameters()))
    for a, b in zip(g, g_ref):
        assert float((a - b).norm()) <= 1e-8 * max(float(b.norm()), 1e-3)
    # the initial condition holds by construction
    x0 = x.clone()
    x0[:, 0] = 0
    assert torch.equal(fm(x0), x0[:, 1:3])


def test_exact_jacobian_norm_and_hutchinson_estimate():
    m = _model(width=7)
    t = torch.rand(3, 1, dtype=torch.float64)
    m(t)
    z = m.last_z.detach()
    J = torch.func.vmap(torch.func.jacrev(lambda zz, xx: m.cell(zz[None], xx[None])[0]))(z, t)
    assert torch.allclose(m.jacobian_frobenius(z), torch.linalg.matrix_norm(J), atol=1e-12)
    # Hutchinson: E‖vᵀJ‖² = ‖J‖_F²; average many independent probes (rows repeated)
    reps = 4000
    zz, tt = z.repeat(reps, 1), t.repeat(reps, 1)
    est = hutchinson_frobenius(m.cell, zz, tt, generator=torch.Generator().manual_seed(0)) ** 2
    mean = est.reshape(reps, 3).mean(0)
    assert torch.allclose(mean, torch.linalg.matrix_norm(J) ** 2, rtol=0.05)


def test_bad_inputs_give_clear_errors():
    m = _model()
    loss = PhysicsLoss(lambda t, y: van_der_pol(t, y))
    t = torch.rand(4, 1, dtype=torch.float64)
    bad = t.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="collocation points contains 1 NaN"):
        loss(m, bad)
    y = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="data targets contains"):
        loss(m, t, data=(torch.zeros(1, 1), y))
    with pytest.raises(ValueError, match="physics_weight"):
        PhysicsLoss(lambda t, y: y, physics_weight=-1.0)
    with pytest.raises(ValueError, match="rhs returned shape"):
        PhysicsLoss(lambda t, y: y[:, :1])(m, t)
    with pytest.raises(ValueError, match="horizon"):
        FlowMap(PIDEQ(4, 2, 3), 2, 1, horizon=-0.5)


def test_taylor_flow_map_matches_rhs_to_first_order():
    torch.manual_seed(2)
    fm = FlowMap(PIDEQ(4, 2, 5, rho=0.3, tol=1e-12).double(), 2, 1, horizon=0.25, rhs=van_der_pol)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.zeros(5, 1), torch.randn(5, 2, generator=gen), torch.full((5, 1), 1.5)], 1).requires_grad_()
    y = fm(x)
    assert torch.equal(y, x[:, 1:3])
    dy = output_gradient(y, x, 0)
    assert torch.allclose(dy, van_der_pol(x[:, 0], x[:, 1:3], x[:, 3]), atol=1e-12)


def test_flow_map_tangents_match_reverse_mode_for_every_input():
    """The Taylor skip's (∂F/∂y)F term runs inside the forward-mode pass (two reverse passes,
    no nested forward level): tangents along Δ, y0 and μ equal reverse-mode gradients."""
    torch.manual_seed(1)
    core = PIDEQ(4, 2, 5, rho=0.3, tol=1e-13, max_iter=300).double()
    fm = FlowMap(core, 2, 1, horizon=0.5, state_scale=(2.0, 3.0), cond_center=1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(6, 1, generator=gen) * 0.5, torch.randn(6, 2, generator=gen), torch.ones(6, 1)], 1)
    for column in range(4):
        _, dy = output_tangent(fm, x, column)
        xr = x.clone().requires_grad_()
        torch.testing.assert_close(dy, output_gradient(fm(xr), xr, column), rtol=1e-10, atol=1e-12)
