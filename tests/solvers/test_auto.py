"""The default forward solver: plain iteration, then Anderson for the rows still running."""

from __future__ import annotations

import pytest
import torch

import deqdiff
from deqdiff.solvers import get_solver
from deqdiff.solvers.anderson import anderson
from deqdiff.solvers.auto import auto
from deqdiff.solvers.fixed_point_iteration import fixed_point_iteration

from tests.conftest import contractive_matrix


def _problem(S: int, n: int, rho: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = contractive_matrix(n, rho, gen)
    c = torch.randn(S, n, generator=gen)
    return (lambda z: torch.tanh(z @ A.T + c)), torch.zeros(S, n)


def test_rows_fast_enough_for_plain_iteration_never_reach_anderson():
    g, z0 = _problem(4, 6, 0.3)
    z, info = auto(g, z0, tol=1e-10, max_iter=100, picard_iter=40)
    ref, info_ref = fixed_point_iteration(g, z0, tol=1e-10, max_iter=100)
    assert torch.equal(z, ref) and torch.equal(info.iterations, info_ref.iterations)
    assert info.solver == "auto" and "finished_rows" not in info.extra


def test_slow_rows_are_finished_by_anderson_from_the_plain_iterate():
    g, z0 = _problem(5, 8, 0.99)
    z, info = auto(g, z0, tol=1e-10, max_iter=200, picard_iter=5)
    assert info.all_converged and info.extra["finished_rows"] == 5
    torch.testing.assert_close(g(z), z, rtol=0, atol=1e-8)
    # the same as running 5 plain steps and Anderson on their result
    z5, _ = fixed_point_iteration(g, z0, tol=0.0, max_iter=5)
    zA, infoA = anderson(g, z5, tol=1e-10, max_iter=195)
    torch.testing.assert_close(z, zA, rtol=0, atol=1e-12)
    assert torch.equal(info.iterations, infoA.iterations + 5)


def test_rows_that_plain_iteration_drives_away_restart_from_their_start():
    # g(z) = 1.5 z + 1 diverges under plain iteration from 0 (fixed point −2, |g'| > 1);
    # Anderson without restarts (a secant step on a linear map) finds it from the start; from
    # plain iteration's 10th iterate (≈ −113) it would too, so compare with that start's count
    g = lambda z: 1.5 * z + 1.0  # noqa: E731
    z0 = torch.zeros(3, 2)
    z, info = auto(g, z0, tol=1e-10, max_iter=50, picard_iter=10, restart=None)
    assert info.all_converged
    _, from_start = anderson(g, z0, tol=1e-10, max_iter=40, restart=None)
    assert torch.equal(info.iterations, from_start.iterations + 10)
    torch.testing.assert_close(z, torch.full_like(z0, -2.0))


def test_row_answers_do_not_depend_on_the_batch():
    g, z0 = _problem(6, 5, 0.97, seed=1)
    z, _ = auto(g, z0, tol=1e-9, max_iter=300, picard_iter=8)
    gen = torch.Generator().manual_seed(1)
    A = contractive_matrix(5, 0.97, gen)
    c = torch.randn(6, 5, generator=gen)
    for s in (0, 3, 5):
        zs, _ = auto(lambda v: torch.tanh(v @ A.T + c[s:s + 1]), z0[s:s + 1], tol=1e-9, max_iter=300, picard_iter=8)
        torch.testing.assert_close(z[s:s + 1], zs, rtol=1e-9, atol=1e-12)


def test_trajectory_holds_every_iterate_of_both_phases():
    g, z0 = _problem(3, 4, 0.95)
    z, info = auto(g, z0, tol=1e-9, max_iter=100, picard_iter=4, store_trajectory=True)
    assert len(info.trajectory) == 5 + len([1 for _ in info.trajectory[5:]])
    torch.testing.assert_close(info.trajectory[-1], z)


def test_is_the_default_and_differentiates_like_anderson():
    gen = torch.Generator().manual_seed(2)
    A = contractive_matrix(6, 0.9, gen).requires_grad_()
    x = torch.randn(4, 6, generator=gen).requires_grad_()
    f = lambda z, A, x: torch.tanh(z @ A.T + x)  # noqa: E731
    z, info = deqdiff.fixed_point(f, torch.zeros(4, 6), A, x, tol=1e-11, return_info=True)
    assert info.forward.solver == "auto"
    ref = deqdiff.fixed_point(f, torch.zeros(4, 6), A, x, tol=1e-11, solver="anderson")
    ga = torch.autograd.grad(z.square().sum(), (A, x))
    gr = torch.autograd.grad(ref.square().sum(), (A, x))
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_bad_picard_iter_is_refused():
    g, z0 = _problem(2, 3, 0.5)
    with pytest.raises(ValueError, match="picard_iter"):
        get_solver("auto")(g, z0, picard_iter=-1)
