"""Maps without a fixed point: every forward solver ends promptly and reports the failure with
its residual (Newton–Krylov used to spend 23–32 s on g(z) = z + 1 with 8 unknowns)."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

from deqdiff import fixed_point
from deqdiff.solvers import ConvergenceError, ConvergenceWarning
from deqdiff.solvers.newton_krylov import newton_krylov
from solver_problems import FORWARD


class Counted:
    """g(z) = z + 1 (F = g − z ≡ 1: no fixed point, J_F = 0), counting its evaluations."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        return z + 1


@pytest.mark.parametrize("solver", FORWARD)
def test_shift_map_ends_promptly_and_reports_failure(solver):
    g = Counted()
    t0 = time.perf_counter()
    with pytest.raises(ConvergenceError, match=r"did not converge.*residual 2\.828e\+00") as err:
        fixed_point(g, torch.zeros(8, dtype=torch.float64), solver=solver, max_iter=200, on_fail="raise")
    seconds = time.perf_counter() - t0
    info = err.value.info
    assert not info.converged.any()
    assert math.isclose(float(info.residual[0]), math.sqrt(8), rel_tol=1e-12)  # ‖F‖ = √8 at every iterate
    assert g.calls <= 200 + 3  # one evaluation per iteration (+ validation and a final check)
    if solver == "newton_krylov":
        # J_F = 0: the first Newton system has no descent direction; the row stops at once
        assert info.extra["stopped"].tolist() == [1] and info.max_iterations == 0
        assert g.calls <= 3
    assert seconds < 5.0, f"{solver} took {seconds:.1f} s on a map without a fixed point"


@pytest.mark.parametrize("solver", FORWARD)
def test_shift_map_warns_by_default(solver):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, info = fixed_point(lambda z: z + 1, torch.zeros(8, dtype=torch.float64), solver=solver, return_info=True)
    assert not info.forward.all_converged
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


def test_newton_krylov_stops_on_stagnation():
    """F(z) = 1 + z² per entry has no root and a nonsingular Jacobian at z = 0.5: Newton wanders
    (z ← (z² − 1)/2z); the rows stop after ``stall`` steps without a new best residual."""
    g = lambda z: z + 1 + z**2  # noqa: E731
    with torch.no_grad():
        z, info = newton_krylov(g, torch.full((2, 8), 0.5, dtype=torch.float64), max_iter=200, stall=5)
    assert not info.converged.any()
    assert info.extra["stopped"].tolist() == [2, 2]
    assert int(info.iterations.max()) < 40
    # the reported residual is that of the returned iterate
    torch.testing.assert_close(info.residual, torch.linalg.vector_norm(g(z) - z, dim=1), rtol=1e-12, atol=0)


def test_newton_krylov_stopped_rows_do_not_hold_back_the_rest():
    """A batch with one solvable row (contractive) and one without a root: the good row
    converges to its fixed point, the other is reported, as each would be alone."""
    A = torch.tensor([[0.3, 0.1], [-0.2, 0.4]], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def g(z):
        good = z[:1] @ A.T + c
        bad = z[1:] + 1
        return torch.cat([good, bad])

    with torch.no_grad():
        z, info = newton_krylov(g, torch.zeros(2, 2, dtype=torch.float64), tol=1e-12)
    assert info.converged.tolist() == [True, False]
    assert info.extra["stopped"].tolist() == [0, 1]
    z_star = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, c)
    torch.testing.assert_close(z[0], z_star, atol=1e-10, rtol=0)


def test_newton_krylov_under_inference_mode():
    A = 0.4 * torch.eye(4, dtype=torch.float64)
    with torch.inference_mode():
        z, info = newton_krylov(lambda z: torch.tanh(z @ A.T + 1), torch.zeros(3, 4, dtype=torch.float64), tol=1e-12)
    assert info.all_converged
    torch.testing.assert_close(z, torch.tanh(z @ A.T + 1), atol=1e-11, rtol=0)


def test_newton_krylov_stall_option_is_checked():
    with pytest.raises(ValueError, match="stall"):
        newton_krylov(lambda z: z, torch.zeros(1, 2), stall=0)


def test_newton_krylov_early_stop_says_more_iterations_will_not_help():
    import deqdiff
    from deqdiff.solvers import ConvergenceError

    f = lambda z, c: z + c  # noqa: E731  (no fixed point: Newton finds no descent direction)
    with pytest.raises(ConvergenceError, match="stopped early .*no descent direction.*will not help"):
        deqdiff.fixed_point(f, torch.zeros(2, 3), torch.ones(2, 3), solver="newton_krylov", on_fail="raise")
    with pytest.raises(ConvergenceError, match="Increase max_iter"):
        deqdiff.fixed_point(lambda z, c: 0.99 * z + c, torch.zeros(2, 3), torch.ones(2, 3), solver="fixed_point",
                            max_iter=3, on_fail="raise")
