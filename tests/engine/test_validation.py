"""Bad input and non-convergence fail loudly, naming the problem."""

from __future__ import annotations

import pytest
import torch

import deqdiff
from tests.conftest import make_problem, tanh_cell


def test_shape_mismatch_between_z0_and_f(gen):
    z0, p = make_problem(gen)
    with pytest.raises(ValueError, match="shape"):
        deqdiff.fixed_point(lambda z, *a: tanh_cell(z, *a)[:-1], z0, *p)


def test_dtype_mismatch(gen):
    z0, p = make_problem(gen)
    with pytest.raises(TypeError, match="dtype"):
        deqdiff.fixed_point(tanh_cell, z0.float(), *p)


def test_non_tensor_param(gen):
    z0, p = make_problem(gen)
    with pytest.raises(TypeError, match="params\\[0\\]"):
        deqdiff.fixed_point(tanh_cell, z0, 3.0, *p[1:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(gen, bad):
    z0, (A, B, x, b) = make_problem(gen)
    x = x.detach().clone()
    x[0] = bad
    with pytest.raises(ValueError, match="params\\[2\\].*NaN or Inf"):
        deqdiff.fixed_point(tanh_cell, z0, A, B, x, b)
    z0 = z0.clone()
    z0[0] = bad
    with pytest.raises(ValueError, match="z0 contains NaN"):
        deqdiff.fixed_point(tanh_cell, z0, A, B, x.nan_to_num(0.0, 0.0, 0.0), b)


def test_closure_capturing_tensor_that_requires_grad(gen):
    z0, (A, B, x, b) = make_problem(gen)
    with pytest.raises(ValueError, match="closure"):
        deqdiff.fixed_point(lambda z, x: torch.tanh(z @ A.T + x @ B.T), z0, x)


def test_non_convergence_raises_with_residual(gen):
    z0, p = make_problem(gen, rho=0.99)
    with pytest.raises(deqdiff.ConvergenceError, match=r"after 3 iterations.*residual \d\.\d+e[-+]\d+"):
        deqdiff.fixed_point(tanh_cell, z0, *p, solver="fixed_point", tol=1e-12, max_iter=3, on_fail="raise")


def test_non_convergence_warns_and_reports(gen):
    z0, p = make_problem(gen, rho=0.99)
    with pytest.warns(deqdiff.ConvergenceWarning, match="did not converge"):
        z, info = deqdiff.fixed_point(
            tanh_cell, z0, *p, solver="fixed_point", tol=1e-12, max_iter=3, return_info=True
        )
    assert not info.forward.all_converged and info.forward.max_residual > 1e-12


def test_derivative_solve_non_convergence_is_reported(gen):
    z0, p = make_problem(gen, rho=0.9)
    z = deqdiff.fixed_point(
        tanh_cell, z0, *p, tol=1e-12, backward_solver="richardson", backward_max_iter=2, on_fail="raise"
    )
    with pytest.raises(deqdiff.ConvergenceError, match="linear solve 'derivative"):
        torch.autograd.grad(z.sum(), p[0])


def test_unknown_solver_names_the_choices(gen):
    z0, p = make_problem(gen)
    with pytest.raises(ValueError, match="available"):
        deqdiff.fixed_point(tanh_cell, z0, *p, solver="nope")


def test_batch_ndim_out_of_range(gen):
    z0, p = make_problem(gen)
    with pytest.raises(ValueError, match="batch_ndim"):
        deqdiff.fixed_point(tanh_cell, z0, *p, batch_ndim=3)


@pytest.mark.parametrize("options,match", [
    (dict(tol=0), "tol and atol are both 0"),
    (dict(tol=-1e-3), "tol must be a finite number >= 0"),
    (dict(tol=float("nan")), "tol must be a finite number >= 0"),
    (dict(atol=float("inf")), "atol must be a finite number >= 0"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    (dict(on_fail="bogus"), "on_fail must be one of"),
    (dict(backward_tol=-1.0), "backward_tol must be"),
    (dict(backward_max_iter=0), "backward_max_iter must be"),
])
def test_bad_solve_options_are_refused_up_front(gen, options, match):
    z0, p = make_problem(gen)
    with pytest.raises(ValueError, match=match):
        deqdiff.fixed_point(tanh_cell, z0, *p, **options)


def test_tol_below_the_dtype_resolution_names_it(gen):
    z0, p = make_problem(gen)
    with pytest.raises(ValueError, match="below the resolution of torch.float32"):
        deqdiff.fixed_point(tanh_cell, z0.float(), *(t.detach().float() for t in p), tol=1e-9)


def test_zero_tolerance_runs_max_iter_when_failure_is_ignored(gen):
    z0, p = make_problem(gen)
    _, info = deqdiff.fixed_point(tanh_cell, z0, *p, solver="fixed_point", tol=0, max_iter=7, on_fail="ignore",
                                  return_info=True)
    assert info.forward.max_iterations == 7 or bool((info.forward.residual == 0).all())


def test_linear_solve_options_are_validated():
    b = torch.ones(3)
    with pytest.raises(ValueError, match="max_iter"):
        deqdiff.linear_solve(lambda v: 2 * v, b, max_iter=0)
    with pytest.raises(TypeError, match="floating-point"):
        deqdiff.linear_solve(lambda v: 2 * v, torch.ones(3, dtype=torch.long))


def test_singular_jacobian_at_the_fixed_point_says_the_ift_does_not_apply():
    x = torch.ones(3, requires_grad=True)
    z = deqdiff.fixed_point(lambda z, x: z + 0 * x, torch.ones(3), x, backward_solver="dense")
    with pytest.raises(deqdiff.SingularOperatorError, match="implicit function theorem does not apply"):
        torch.autograd.grad(z.sum(), x)


def test_singular_linear_operator_is_named():
    with pytest.raises(deqdiff.SingularOperatorError, match="linear operator A is singular"):
        deqdiff.linear_solve(lambda v: v * torch.tensor([1.0, 0.0]), torch.ones(2), solver="dense")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_any_nan_or_inf_and_passes_huge_finite_values(dtype):
    from deqdiff.engine.validation import all_finite

    fi = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 4000):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in {0, n // 2, n - 1}:
                t = torch.randn(n, generator=gen).to(dtype)
                t[pos] = bad
                assert not all_finite(torch.ones(3, dtype=dtype), t)
                assert not all_finite(t.reshape(1, -1).expand(2, -1).t())  # strided
    assert all_finite(torch.full((5,), fi.max, dtype=dtype), torch.full((2, 2), -fi.max, dtype=dtype))
    assert all_finite() and all_finite(torch.empty(0, dtype=dtype))
