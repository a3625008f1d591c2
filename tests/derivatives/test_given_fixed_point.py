"""A z_star that is not a fixed point is reported (on_fail) with its residual, never silently
polished; a converged one (any dtype, at fixed_point's default tolerance) passes silently."""

from __future__ import annotations

import warnings

import pytest
import torch

import deqdiff
from deqdiff.derivatives import LossHessian, deq_jvp, derivative_loss_grad, time_derivatives
from deqdiff.solvers.base import ConvergenceError, ConvergenceWarning
from tests.conftest import make_problem, rel_err, tanh_cell
from tests.derivatives.helpers import make_time_problem, solve, time_cell


@pytest.fixture
def setup(gen):
    z0, p = make_problem(gen, batch=4)
    params = tuple(q.detach() for q in p)
    z = solve(tanh_cell, z0, params, batch_ndim=1)
    return z, params


def _res(z, params):
    return float(((tanh_cell(z, *params) - z).norm(dim=-1) / tanh_cell(z, *params).norm(dim=-1)).max())


def test_unconverged_z_star_warns_with_its_residual(setup):
    z, params = setup
    bad = z.clone()
    bad[2] += 1e-3  # one row off the fixed point
    r = _res(bad, params)
    with pytest.warns(ConvergenceWarning, match=r"z_star is not a fixed point.*1/4 rows.*worst row 2") as rec:
        out = deq_jvp(tanh_cell, bad, params, 0, torch.ones(5, 5), batch_ndim=1)
    assert f"{r:.3e}" in str(rec[0].message)  # the relative residual of the given z*
    # it was polished: the result equals the one at the converged z*
    assert rel_err(out, deq_jvp(tanh_cell, z, params, 0, torch.ones(5, 5), batch_ndim=1)) < 1e-9


@pytest.mark.parametrize("call", ["jvp", "hessian", "time", "loss_grad"])
def test_raise_and_ignore(setup, call, gen):
    if call in ("time", "loss_grad"):
        z0, p = make_time_problem(gen, batch=3)
        z = solve(time_cell, z0, p, batch_ndim=1) + 1e-4

        def run(**kw):
            if call == "time":
                return time_derivatives(time_cell, z, p, 5, batch_ndim=1, **kw)
            return derivative_loss_grad(time_cell, z, p, 5, 0, lambda q: q, lambda y: (y**2).sum(),
                                        batch_ndim=1, **kw)
    else:
        z, params = setup
        z = z + 1e-4

        def run(**kw):
            if call == "jvp":
                return deq_jvp(tanh_cell, z, params, 0, torch.ones(5, 5), batch_ndim=1, **kw)
            return LossHessian(tanh_cell, z, params, lambda h: (h**2).sum(), 0, batch_ndim=1, **kw)

    with pytest.raises(ConvergenceError, match="z_star is not a fixed point.*residual"):
        run(on_fail="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(on_fail="ignore")
        run(z_tol=1e-2)  # accepted by a looser z_tol


def test_converged_z_star_is_silent_in_float64_and_float32(gen):
    for dtype in (torch.float64, torch.float32):
        z0, p = make_problem(gen, batch=4)
        params = tuple(q.detach().to(dtype) for q in p)
        z = deqdiff.fixed_point(tanh_cell, z0.to(dtype), *params, batch_ndim=1)  # default tol 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            H = LossHessian(tanh_cell, z, params, lambda h: (h**2).sum(), 0, batch_ndim=1)
            H.hvp(torch.ones(5, 5, dtype=dtype))
        assert H.solves[0].tol == (1e-10 if dtype == torch.float64 else pytest.approx(100 * torch.finfo(dtype).eps))
