"""Named derivatives of the PDE interface: every derivative the implicit engine returns (up to
third order in x, mixed, in 1–3 input dimensions, several outputs) against unrolled float64
autodiff on a strongly contractive DEQ and against finite differences; the weight gradient of a
loss on u_xxx (fourth order in total); laziness and solve counts."""

from __future__ import annotations

import pytest
import torch

from deqdiff.physics.coordinate_models import CoordinateMLP, CoordinatePIDEQ
from deqdiff.physics.fields import fields, parse_name

BOUNDS3 = [(-1.0, 1.0), (0.0, 2.0), (0.5, 1.5)]


def _pair(bounds, outputs=1, width=5, seed=0):
    """The same small contractive DEQ twice: implicit (tight tol) and unrolled (400 its)."""
    torch.manual_seed(seed)
    imp = CoordinatePIDEQ(bounds, outputs, width, rho=0.2, tol=1e-13, max_iter=300)
    with torch.no_grad():
        imp.D.weight.normal_()  # a nonzero skip, so u's derivatives see D as well
    unr = CoordinatePIDEQ(bounds, outputs, width, rho=0.3, tol=1e-14, max_iter=400, mode="unrolled")
    unr.load_state_dict(imp.state_dict())
    return imp, unr


def _points(bounds, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([b[0] for b in bounds])
    hi = torch.tensor([b[1] for b in bounds])
    return lo + (hi - lo) * torch.rand(n, len(bounds), generator=g)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


NAMES_3D = ["u", "v", "u_x", "v_t", "u_xx", "u_xt", "v_yy", "u_xxx", "u_xxt", "v_xty"]


def test_every_derivative_matches_unrolled_autodiff_up_to_third_order():
    imp, unr = _pair(BOUNDS3, outputs=2)
    X = _points(BOUNDS3)
    a = fields(imp, X, ("x", "t", "y"), ("u", "v"), tol=1e-13)
    b = fields(unr, X, ("x", "t", "y"), ("u", "v"))
    for name in NAMES_3D:
        assert _rel(a[name], b[name]) < 1e-9, name
    # mixed partials do not depend on the order of the letters
    assert torch.equal(a.u_tx, a.u_xt) and torch.equal(a["u_txx"], a.u_xxt)


def test_derivatives_match_finite_differences():
    """u_x, u_xx, u_xxx and u_xt against central differences of u itself (no autodiff)."""
    bounds = [(-1.0, 1.0), (0.0, 1.0)]
    imp, _ = _pair(bounds, width=6, seed=3)
    X = _points(bounds, n=5)
    d = fields(imp, X, ("x", "t"), tol=1e-13)
    h = 1e-3
    ex, et = torch.tensor([h, 0.0]), torch.tensor([0.0, h])
    with torch.no_grad():
        u = lambda P: imp(P, tol=1e-14)[:, 0]  # noqa: E731
        ux = (u(X + ex) - u(X - ex)) / (2 * h)
        uxx = (u(X + ex) - 2 * u(X) + u(X - ex)) / h ** 2
        uxxx = (u(X + 2 * ex) - 2 * u(X + ex) + 2 * u(X - ex) - u(X - 2 * ex)) / (2 * h ** 3)
        uxt = (u(X + ex + et) - u(X + ex - et) - u(X - ex + et) + u(X - ex - et)) / (4 * h * h)
    assert _rel(d.u_x, ux) < 1e-6
    assert _rel(d.u_xx, uxx) < 1e-5
    assert _rel(d.u_xt, uxt) < 1e-4  # O(h²) truncation
    assert _rel(d.u_xxx, uxxx) < 1e-3


def test_weight_gradient_through_third_derivative_matches_unrolled():
    """The gradient of a KdV-type residual loss w.r.t. every weight: fourth order in total."""
    bounds = [(-1.0, 1.0), (0.0, 1.0)]
    imp, unr = _pair(bounds, width=5, seed=2)
    X = _points(bounds, n=6)
    losses = []
    for m in (imp, unr):
        d = fields(m, X, ("x", "t"), tol=1e-13)
        r = d.u_t + d.u * d.u_x + 0.1 * d.u_xxx
        losses.append((r * r).mean())
    assert abs(float(losses[0] - losses[1])) < 1e-10 * float(losses[1].detach())
    ga = torch.autograd.grad(losses[0], list(imp.parameters()))
    gb = torch.autograd.grad(losses[1], list(unr.parameters()))
    for (name, _), x, y in zip(imp.named_parameters(), ga, gb):
        assert _rel(x, y) < 1e-8, name


def test_only_requested_derivatives_are_solved_and_they_share_one_equilibrium():
    bounds = [(0.0, 1.0), (0.0, 1.0)]
    imp, _ = _pair(bounds)
    X = _points(bounds)
    d = fields(imp, X, ("x", "y"), tol=1e-12)
    engine = d._compute
    _ = d.u
    assert engine.solves == 0
    _ = d.u_xx
    assert engine.solves == 2  # z_x, z_xx
    _ = d.u_xx + d.u_yy + d.u_x
    assert engine.solves == 4  # + z_y, z_yy; u_x reuses z_x
    _ = d.u_xxx
    assert engine.solves == 5
    n_ops = len(engine.eq.solves)
    assert n_ops == 5  # every solve ran with the one operator at z*


def test_explicit_model_uses_autodiff_and_matches_finite_differences():
    bounds = [(-1.0, 1.0), (0.0, 1.0)]
    torch.manual_seed(0)
    m = CoordinateMLP(bounds, 1, 8, 2)
    X = _points(bounds)
    d = fields(m, X, ("x", "t"))
    h = 1e-4
    e = torch.tensor([0.0, h])
    with torch.no_grad():
        ut = (m(X + e) - m(X - e))[:, 0] / (2 * h)
        utt = (m(X + e) - 2 * m(X) + m(X - e))[:, 0] / h ** 2
    assert _rel(d.u_t, ut) < 1e-7 and _rel(d.u_tt, utt) < 1e-5
    assert d.u_xx.requires_grad


def test_graph_false_returns_detached_values():
    bounds = [(-1.0, 1.0)]
    imp, _ = _pair(bounds)
    d = fields(imp, _points(bounds), ("x",), graph=False, tol=1e-12)
    assert not d.u_xx.requires_grad and not d.u.requires_grad


def test_names_and_shapes_are_checked():
    assert parse_name("u_xt", ("x", "t"), ("u",)) == ("field", 0, (0, 1))
    assert parse_name("t", ("x", "t"), ("u",)) == ("coord", 1, ())
    with pytest.raises(KeyError, match="not a coordinate"):
        parse_name("u_z", ("x", "t"), ("u",))
    with pytest.raises(KeyError):
        parse_name("w", ("x", "t"), ("u",))
    imp, _ = _pair([(-1.0, 1.0)])
    d = fields(imp, _points([(-1.0, 1.0)]), ("x",))
    with pytest.raises(AttributeError, match="not a coordinate"):
        _ = d.u_q
    with pytest.raises(ValueError, match="shape"):
        fields(imp, torch.zeros(3, 2), ("x",))
    with pytest.raises(ValueError, match="single characters"):
        fields(imp, torch.zeros(3, 1), ("xx",))
