"""Item 3: ∂z*/∂t and ∂²z*/∂t² by forward-mode implicit solves, with a graph for the
gradient of a physics-informed loss w.r.t. the weights, against unrolled autodiff."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

import deqdiff
from deqdiff.derivatives import input_derivatives, time_derivatives
from tests.conftest import rel_err, unrolled
from tests.derivatives.helpers import TIGHT, SolveCounter, make_time_problem, time_cell


def unrolled_time(z0, A, U, a, b, x, t):
    g = lambda t: unrolled(time_cell, z0, A, U, a, b, x, t)
    one = torch.ones_like(t)
    z_t = jvp(g, (t,), (one,))[1]
    z_tt = jvp(lambda t: jvp(g, (t,), (one,))[1], (t,), (one,))[1]
    return z_t, z_tt


@pytest.mark.parametrize("batch", [None, 4])
def test_time_derivatives_and_pinn_gradient_match_unrolled(gen, batch, monkeypatch):
    z0, p = make_time_problem(gen, batch=batch)
    A, U, a, b, x, t = p
    A, U, a = (q.clone().requires_grad_() for q in (A, U, a))
    nb = 0 if batch is None else 1
    z = deqdiff.fixed_point(time_cell, z0, A, U, a, b, x, t, batch_ndim=nb, **TIGHT)
    count = SolveCounter(monkeypatch)
    z_t, z_tt = time_derivatives(time_cell, z, (A, U, a, b, x, t), 5, order=2, batch_ndim=nb)
    assert count.calls == 2
    r_t, r_tt = unrolled_time(z0, A, U, a, b, x, t)
    assert rel_err(z_t, r_t) < 1e-11 and rel_err(z_tt, r_tt) < 1e-10

    def pinn(z_t, z_tt):  # e.g. a residual of z_tt + z_t + z = 0
        return ((z_tt + 0.5 * z_t + z.detach()) ** 2).sum()

    got = torch.autograd.grad(pinn(z_t, z_tt), (A, U, a))
    ref = torch.autograd.grad(pinn(r_t, r_tt), (A, U, a))
    for g_, r_ in zip(got, ref):
        assert rel_err(g_, r_) < 1e-9
    (z_t1,) = time_derivatives(time_cell, z, (A, U, a, b, x, t), 5, batch_ndim=nb)
    assert rel_err(z_t1, r_t) < 1e-11


def test_input_coordinate_derivatives_with_one_hot_tangent(gen):
    """∂z*/∂x_1 and ∂²z*/∂x_1² (per sample) with a one-hot tangent on x."""
    z0, p = make_time_problem(gen, batch=3)
    A, U, a, b, x, t = p
    z = deqdiff.fixed_point(time_cell, z0, *p, batch_ndim=1, **TIGHT)
    e = torch.zeros_like(x)
    e[:, 1] = 1
    z_x, z_xx = time_derivatives(time_cell, z, p, 4, order=2, tangent=e, batch_ndim=1)
    g = lambda x: unrolled(time_cell, z0, A, U, a, b, x, t)
    assert rel_err(z_x, jvp(g, (x,), (e,))[1]) < 1e-11
    assert rel_err(z_xx, jvp(lambda x: jvp(g, (x,), (e,))[1], (x,), (e,))[1]) < 1e-10


def test_fd_of_time_derivative(gen):
    z0, p = make_time_problem(gen)
    A, U, a, b, x, t = p
    z = deqdiff.fixed_point(time_cell, z0, *p, **TIGHT)
    _, z_tt = time_derivatives(time_cell, z, p, 5, order=2)

    def z_t_at(tt):
        zz = deqdiff.fixed_point(time_cell, z0, A, U, a, b, x, tt, **TIGHT)
        return time_derivatives(time_cell, zz, (A, U, a, b, x, tt), 5)[0]

    eps = 1e-5
    assert rel_err(z_tt, (z_t_at(t + eps) - z_t_at(t - eps)) / (2 * eps)) < 1e-8


def test_input_derivatives_share_one_node_and_match_unrolled(gen, monkeypatch):
    """Several directions (t, and x along a one-hot) plus ∂²/∂x² in one call: the same
    values as unrolled autodiff, one solve each, and z* re-entered with its graph so that a
    loss on z, z_t, z_xx differentiates w.r.t. the weights exactly."""
    z0, p = make_time_problem(gen, batch=3)
    A, U, a, b, x, t = p
    A = A.clone().requires_grad_()
    p = (A, U, a, b, x, t)
    z = deqdiff.fixed_point(time_cell, z0, *p, batch_ndim=1, **TIGHT)
    e = torch.zeros_like(x)
    e[:, 1] = 1
    count = SolveCounter(monkeypatch)
    zz, d = input_derivatives(time_cell, z.detach(), p, {"t": 5, "x": 4}, second=("x",), tangents={"x": e},
                              batch_ndim=1)
    assert count.calls == 3 and set(d) == {"t", "x", "xx"}
    g = lambda A, x, t: unrolled(time_cell, z0, A, U, a, b, x, t)  # noqa: E731
    r_t = jvp(lambda t: g(A, x, t), (t,), (torch.ones_like(t),))[1]
    r_x = lambda A: jvp(lambda x: g(A, x, t), (x,), (e,))[1]  # noqa: E731
    r_xx = lambda A: jvp(lambda x: jvp(lambda x: g(A, x, t), (x,), (e,))[1], (x,), (e,))[1]  # noqa: E731
    assert rel_err(d["t"], r_t) < 1e-11 and rel_err(d["x"], r_x(A)) < 1e-11 and rel_err(d["xx"], r_xx(A)) < 1e-10
    loss = lambda z, zx, zxx: ((zxx + z * zx) ** 2).sum()  # noqa: E731  (Burgers-like)
    (got,) = torch.autograd.grad(loss(zz, d["x"], d["xx"]), A)
    (ref,) = torch.autograd.grad(loss(g(A, x, t), r_x(A), r_xx(A)), A)
    assert rel_err(got, ref) < 1e-9
    with pytest.raises(ValueError, match="second derivatives need their first"):
        input_derivatives(time_cell, z.detach(), p, {"t": 5}, second=("x",), batch_ndim=1)
