"""The neural solver's kernel initializer (kernel ridge regression of the fixed points on the
injections, Saunders, Gammerman & Vovk 1998) against scikit-learn's KernelRidge, its held-out
choice of bandwidth and ridge, a fit on a frozen DEQ with it (fixed points within tolerance, fewer
f-evaluations than Anderson, unchanged gradients, checkpoint round-trip), the warm-started ground
truth, the "no mixer" rule and the CPU-time budget."""

from __future__ import annotations

import pytest
import torch

import deqdiff
from deqdiff.solvers.anderson import anderson
from deqdiff.solvers.neural import KernelInitializer, NeuralSolver, NeuralSolverConfig, neural_solver
from deqdiff.solvers.neural_fit import FitConfig, _flat_map, _warm_ground_truth, fit_neural_solver, ground_truth


from solver_problems import NEURAL_D as D, NEURAL_N as N, NeuralTanhCell as TanhCell, neural_inputs as _inputs, neural_zeros as _zeros



@pytest.fixture(scope="module")
def fitted():
    torch.set_default_dtype(torch.float64)
    cell = TanhCell().requires_grad_(False)
    res = fit_neural_solver(cell, _inputs(256, 1), _zeros,
                            fit=FitConfig(steps=0, initializer="kernel", warm_start=64, gt_tol=1e-10))
    return cell.requires_grad_(True), res


def test_kernel_initializer_matches_scikit_learn_kernel_ridge():
    sklearn_kr = pytest.importorskip("sklearn.kernel_ridge")
    gen = torch.Generator().manual_seed(3)
    x, z = torch.randn(60, 2, 3, generator=gen), torch.randn(60, 4, generator=gen)
    ini = KernelInitializer((2, 3), (4,), centers=60, rank=6)  # rank = input size: distances kept exactly
    info = ini.fit(x, z, torch.Generator().manual_seed(0))
    xt = torch.randn(7, 2, 3, generator=gen)
    X = x.reshape(60, -1).numpy()
    ref = sklearn_kr.KernelRidge(alpha=info["ridge"], kernel="rbf", gamma=1.0 / float(ini.bandwidth))
    z_mean = z.mean(0)
    ref.fit(X, (z - z_mean).numpy())
    expected = torch.from_numpy(ref.predict(xt.reshape(7, -1).numpy())) + z_mean
    torch.testing.assert_close(ini(xt), expected, rtol=1e-8, atol=1e-10)


def test_width_and_ridge_are_the_best_held_out_pair_found():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(200, 2, generator=gen) * 4 - 2
    z = torch.stack([torch.sin(2 * x[:, 0]) * x[:, 1], torch.cos(x[:, 0] + x[:, 1])], 1)  # smooth: small λ wins
    ini = KernelInitializer((2,), (2,), centers=200)
    info = ini.fit(x, z, torch.Generator().manual_seed(0))
    assert info["held_out_error"] == min(info["errors"].values())
    assert info["ridge"] < 1e-2 and info["held_out_error"] < 0.05  # the search left its start (1, 1e-2)
    with pytest.raises(ValueError, match="200 centers"):
        ini.fit(x[:10], z[:10])


def test_width_and_ridge_are_chosen_for_the_dtype_the_initializer_predicts_in():
    """A smooth target: in float64 the search goes to a tiny λ, whose large coefficients of
    alternating sign float32 cannot sum; a float32 initializer validates in float32 and keeps a
    λ it resolves — on fresh inputs far better than the float64 choice cast to float32."""
    gen = torch.Generator().manual_seed(4)

    def target(x):
        return torch.stack([torch.sin(2 * x[:, 0]) * x[:, 1], torch.cos(x[:, 0] + x[:, 1])], 1) + 2.0

    x, xt = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 4 - 2 for n in (400, 500))

    def rel(a):
        return float(((a.double() - target(xt)).norm(dim=1) / target(xt).norm(dim=1)).mean())

    i64 = KernelInitializer((2,), (2,), centers=400).double()
    info64 = i64.fit(x, target(x), torch.Generator().manual_seed(0))
    i32 = KernelInitializer((2,), (2,), centers=400).float()
    info32 = i32.fit(x.float(), target(x).float(), torch.Generator().manual_seed(0))
    assert info64["ridge"] <= 1e-9 and info32["ridge"] > info64["ridge"]
    assert rel(i64(xt)) < 1e-4  # float64 resolves its tiny λ
    assert rel(i32(xt.float())) < 1e-3 < rel(i64.float()(xt.float()))


def test_fitted_solver_returns_a_fixed_point_with_fewer_f_evaluations(fitted):
    cell, res = fitted
    ns = res.solver
    assert ns.config.initializer == "kernel" and res.init_steps_done == 0 and res.steps_done == 0
    assert ns.config.mixer_steps == 0  # no mixer steps: plain Anderson from the learned start
    assert res.init_error < 0.15 and set(res.phases) == {"ground_truth", "kernel", "unrolled", "final"}
    x = _inputs(128, 2)  # held out
    g = _flat_map(cell, x, (N,))
    with torch.no_grad():
        z, info = neural_solver(g, ns.initial_state(x), tol=1e-4, max_iter=200, network=ns)
        _, ref = anderson(g, _zeros(x), tol=1e-4, max_iter=200)
        gz = g(z)
    assert info.all_converged
    assert bool(((z - gz).norm(dim=1) <= 1e-4 * gz.norm(dim=1)).all())
    assert float(info.iterations.double().mean()) < 0.8 * float(ref.iterations.double().mean())


def test_gradients_through_a_deq_using_it_equal_those_with_anderson(fitted):
    cell, res = fitted
    ns = res.solver
    x = _inputs(16, 5).requires_grad_(True)
    deq = deqdiff.DEQ(cell, state_shape=N, tol=1e-11)
    grads = []
    for use in (False, True):
        if use:
            with ns.attached(deq):
                z = deq(x)
            assert deq.last_info.forward.solver == "neural"
        else:
            z = deq(x)
        grads.append(torch.autograd.grad(z.square().sum(), [x, *cell.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_checkpoint_round_trip_keeps_the_kernel(fitted, tmp_path):
    _, res = fitted
    res.solver.save(tmp_path / "ns.pt")
    back = NeuralSolver.load(tmp_path / "ns.pt")
    assert back.config.initializer == "kernel" and back.config.kernel_centers == res.samples
    x = _inputs(9, 6)
    torch.testing.assert_close(back.initial_state(x), res.solver.initial_state(x), rtol=0, atol=0)


def test_warm_started_ground_truth_agrees_with_the_cold_one_in_fewer_f_evaluations():
    cell = TanhCell(1).requires_grad_(False)
    x = _inputs(300, 7)
    cold, ok_c, ev_c = ground_truth(cell, x, _zeros(x), tol=1e-4, return_evals=True)
    fit = FitConfig(initializer="kernel", warm_start=100, gt_tol=1e-4)
    warm, ok_w, ev_w = _warm_ground_truth(cell, x, _zeros, fit, torch.Generator().manual_seed(0))
    assert bool(ok_c.all()) and bool(ok_w.all())
    g = _flat_map(cell, x, (N,))
    assert bool(((warm - g(warm)).norm(dim=1) <= 1e-4 * g(warm).norm(dim=1)).all())
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-3)
    assert torch.equal(ev_w[:100], ev_c[:100])  # the first samples from the default start
    assert float(ev_w[100:].double().mean()) < float(ev_c[100:].double().mean()) - 0.5


def test_no_mixer_rule_is_plain_anderson_from_the_start(fitted):
    cell, res = fitted
    ns = NeuralSolver(NeuralSolverConfig(res.solver.config.state_shape, res.solver.config.input_shape, hidden=8,
                                         mixer_steps=0))
    with torch.no_grad():  # a mixer far from Anderson, which mixer_steps=0 must ignore
        ns.mixer.net[-1].bias.fill_(0.7)
    x = _inputs(20, 8)
    g = _flat_map(cell, x, (N,))
    z0 = 0.1 * torch.ones(20, N)
    with torch.no_grad():
        z, info = neural_solver(g, z0, tol=1e-9, max_iter=100, network=ns)
        z_ref, ref = anderson(g, z0, tol=1e-9, max_iter=100)
    assert torch.equal(z, z_ref) and torch.equal(info.iterations, ref.iterations)


@pytest.mark.parametrize("row_subsets", [True, False])
def test_reset_restarts_stuck_rows_from_zero_with_plain_anderson(fitted, row_subsets):
    cell, res = fitted
    ns = res.solver
    x = _inputs(24, 10)
    g = _flat_map(cell, x, (N,), row_subsets=row_subsets)
    z0 = ns.initial_state(x) + 3.0  # a poor start: no row converges within 4 f-evaluations
    with torch.no_grad():
        z, info = neural_solver(g, z0, tol=1e-9, max_iter=60, network=ns, reset_after=4)
        z_ref, ref = anderson(g, torch.zeros_like(z0), tol=1e-9, max_iter=56)  # the second pass, alone
    assert info.extra["reset_samples"] == 24 and info.all_converged
    torch.testing.assert_close(info.iterations, ref.iterations + 4, rtol=0, atol=0)  # 4 + (k + 1) f-evaluations
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # rows that converge before the reset are left alone; 0 disables it
        _, early = neural_solver(g, ns.initial_state(x), tol=1e-2, max_iter=60, network=ns, reset_after=4)
        _, never = neural_solver(g, z0, tol=1e-9, max_iter=60, network=ns, reset_after=0)
        _, budget = neural_solver(g, z0, tol=0.0, max_iter=8, network=ns, reset_after=4)  # no stopping rule
    assert early.extra["reset_samples"] == 0 and never.extra["reset_samples"] == 0
    assert budget.extra["reset_samples"] == 0 and int(budget.iterations.max()) == 8
    need = ns.config.reset_need
    try:  # a restart that could not finish in the iterations left is not made
        ns.config.reset_need = 57
        with torch.no_grad():
            _, short = neural_solver(g, z0, tol=1e-9, max_iter=60, network=ns, reset_after=4)
        assert short.extra["reset_samples"] == 0
    finally:
        ns.config.reset_need = need


def test_fit_sets_reset_after_from_the_default_start_ground_truth():
    cell = TanhCell().requires_grad_(False)
    x = _inputs(80, 11)
    res = fit_neural_solver(cell, x, _zeros, fit=FitConfig(steps=0, initializer="kernel", warm_start=30, gt_tol=1e-6,
                                                           reset=True))
    _, _, evals = ground_truth(cell, x[:30], _zeros(x[:30]), tol=1e-6, return_evals=True)
    assert res.solver.config.reset_after == int(torch.ceil(evals.double().mean()))
    assert res.solver.config.reset_need == int(evals.max())
    off = fit_neural_solver(cell, x, _zeros, fit=FitConfig(steps=0, initializer="kernel", gt_tol=1e-6, reset=False))
    assert off.solver.config.reset_after is None and off.solver.config.reset_need is None


def test_cpu_budget_stops_the_mixer_steps():
    cell = TanhCell().requires_grad_(False)
    res = fit_neural_solver(cell, _inputs(64, 9), _zeros,
                            config=NeuralSolverConfig((N,), (D,), hidden=8),
                            fit=FitConfig(steps=100_000, batch=8, unroll=2, initializer="kernel", gt_tol=1e-8,
                                          time_budget_s=2.0, budget_clock="cpu"))
    assert 0 < res.steps_done < 100_000 and res.cpu_time_s < 8.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="initializer"):
        FitConfig(initializer="forest")
    with pytest.raises(ValueError, match="warm_start"):
        FitConfig(warm_start=-1)
    with pytest.raises(ValueError, match="budget_clock"):
        FitConfig(budget_clock="sundial")
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=-1)
    with pytest.raises(ValueError, match="kernel_centers"):
        NeuralSolverConfig((4,), (2,), initializer="kernel")
    with pytest.raises(ValueError, match="initializer"):
        NeuralSolverConfig((4,), (2,), initializer="forest")
    with pytest.raises(ValueError, match="mixer_steps"):
        NeuralSolverConfig((4,), (2,), mixer_steps=-1)
    with pytest.raises(ValueError, match="reset_after"):
        NeuralSolverConfig((4,), (2,), reset_after=0)
