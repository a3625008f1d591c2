"""Every derivative the PDE interface returns, up to third order in each coordinate set: all 20
multi-indices of order ≤ 3 in three coordinates, for each of two outputs, from the implicit engine
against nested ``torch.autograd.grad`` through an unrolled float64 copy of the same DEQ (written
here, independently of :mod:`deqdiff.physics.fields`' own autodiff engine); and the weight
gradient of a loss that reads all of them."""

from __future__ import annotations

import itertools

import torch

from deqdiff.physics.coordinate_models import CoordinatePIDEQ
from deqdiff.physics.fields import fields

COORDS = ("x", "t", "y")
OUTPUTS = ("u", "v")
BOUNDS = [(-1.0, 1.0), (0.0, 2.0), (0.5, 1.5)]
MULTI = [c for k in range(4) for c in itertools.combinations_with_replacement(range(3), k)]  # 20 index sets


def _name(out: str, idx: tuple[int, ...]) -> str:
    return out if not idx else out + "_" + "".join(COORDS[i] for i in idx)


def _pair(seed=0):
    torch.manual_seed(seed)
    imp = CoordinatePIDEQ(BOUNDS, 2, 5, rho=0.2, tol=1e-13, max_iter=300)
    with torch.no_grad():
        imp.D.weight.normal_()
    unr = CoordinatePIDEQ(BOUNDS, 2, 5, rho=0.2, tol=1e-14, max_iter=400, mode="unrolled")
    unr.load_state_dict(imp.state_dict())
    return imp, unr


def _points(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor([b[0] for b in BOUNDS]), torch.tensor([b[1] for b in BOUNDS])
    return lo + (hi - lo) * torch.rand(n, 3, generator=g)


def _nested_autograd(model, X):
    """{name: (B,)} by repeated autograd.grad of the unrolled model (samples are independent, so
    the gradient of the batch sum is the per-sample derivative)."""
    X = X.clone().requires_grad_(True)
    y = model(X)
    out = {}
    for o, name in enumerate(OUTPUTS):
        cache = {(): y[:, o]}
        for idx in MULTI[1:]:
            g = torch.autograd.grad(cache[idx[:-1]].sum(), X, create_graph=True)[0][:, idx[-1]]
            cache[idx] = g
        out.update({_name(name, idx): cache[idx] for idx in MULTI})
    return out


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def test_all_derivatives_to_third_order_match_unrolled_float64_autodiff():
    assert len(MULTI) == 20
    imp, unr = _pair()
    X = _points()
    d = fields(imp, X, COORDS, OUTPUTS, tol=1e-13)
    ref = _nested_autograd(unr, X)
    assert len(ref) == 40
    for name, r in ref.items():
        assert d[name].shape == r.shape == (3,), name
        assert _rel(d[name], r) < 1e-9, (name, _rel(d[name], r))


def test_weight_gradient_of_a_loss_reading_every_third_order_derivative():
    imp, unr = _pair(seed=4)
    X = _points(seed=5)
    third = [idx for idx in MULTI if len(idx) == 3]
    d = fields(imp, X, COORDS, OUTPUTS, tol=1e-13)
    ref = _nested_autograd(unr, X)
    la = sum((d[_name(o, i)] ** 2).mean() for o in OUTPUTS for i in third)
    lb = sum((ref[_name(o, i)] ** 2).mean() for o in OUTPUTS for i in third)
    assert abs(float(la - lb)) < 1e-10 * float(lb)
    ga = torch.autograd.grad(la, list(imp.parameters()), allow_unused=True)
    gb = torch.autograd.grad(lb, list(unr.parameters()), allow_unused=True)
    used = 0
    for (name, _), a, b in zip(imp.named_parameters(), ga, gb):
        if b is None:  # the output bias c: no third derivative depends on it
            assert a is None or float(a.abs().max()) == 0.0, name
            continue
        used += 1
        assert _rel(a, b) < 1e-8, name
    assert used >= 4  # A, U, b, C, D
