"""The neural DEQ solver (Bai, Koltun & Kolter 2022): fitted on a tiny frozen DEQ in seconds, it
returns fixed points within tolerance, leaves every derivative unchanged (they are implicit),
round-trips through a checkpoint, and falls back to Anderson with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import deqdiff
from deqdiff.solvers.anderson import anderson
from deqdiff.solvers.neural import FallbackWarning, NeuralSolver, NeuralSolverConfig, neural_solver
from deqdiff.solvers.neural_fit import FitConfig, fit_neural_solver, ground_truth


from solver_problems import NEURAL_D as D, NEURAL_N as N, NeuralTanhCell as TanhCell, neural_inputs as _inputs


@pytest.fixture(scope="module")
def fitted():
    torch.set_default_dtype(torch.float64)
    cell = TanhCell().requires_grad_(False)
    res = fit_neural_solver(cell, _inputs(256, 1), lambda x: x.new_zeros(x.shape[0], N),
                            config=NeuralSolverConfig((N,), (D,), hidden=32, init_hidden=32),
                            fit=FitConfig(steps=80, batch=32, unroll=5, lr=5e-3, gt_tol=1e-10))
    return cell.requires_grad_(True), res


def test_fit_reduces_the_paper_losses_in_seconds(fitted):
    _, res = fitted
    first, last = res.history[0], res.history[-1]
    assert res.left_out == 0 and res.samples == 256
    # the zero start is at relative distance 1 from z*; the fitted initializer far closer
    assert res.init_error < 0.3  # held out
    assert last["loss"] < first["loss"] and last["last"] < first["last"]
    assert res.time_s < 60


def test_fitted_solver_returns_a_fixed_point_within_tolerance(fitted):
    cell, res = fitted
    x = _inputs(32, 2)
    f = lambda z, x, A, U, b: torch.tanh(z @ A.T + x @ U.T + b)  # noqa: E731
    params = (cell.A, cell.U, cell.b)
    z, info = deqdiff.fixed_point(f, res.solver.initial_state(x), x, *params, solver="neural",
                                  network=res.solver, tol=1e-9, return_info=True)
    assert info.forward.solver == "neural" and info.forward.all_converged
    with torch.no_grad():
        fz = f(z, x, *params)
        assert bool(((fz - z).norm(dim=1) <= 1e-9 * fz.norm(dim=1)).all())
        ref, ok = ground_truth(cell, x, torch.zeros(32, N), tol=1e-12)
    assert bool(ok.all())
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-7)


def test_fitted_solver_needs_fewer_f_evaluations_than_anderson_on_held_out_inputs(fitted):
    cell, res = fitted
    x = _inputs(128, 3)
    deq = deqdiff.DEQ(cell, state_shape=N, tol=1e-6)
    with torch.no_grad():
        deq(x)
        anderson_evals = float(deq.last_info.forward.iterations.double().mean()) + 1
        with res.solver.attached(deq):
            deq(x)
        neural_evals = float(deq.last_info.forward.iterations.double().mean()) + 1
        assert deq.last_info.forward.solver == "neural"
    assert neural_evals < 0.8 * anderson_evals, (neural_evals, anderson_evals)
    assert deq.solver_options == {"tol": 1e-6} and deq.z_init is None  # restored after the block


def test_gradients_through_a_deq_using_it_equal_those_with_anderson(fitted):
    cell, res = fitted
    x = _inputs(6, 4).requires_grad_()
    deq = deqdiff.DEQ(cell, state_shape=N, tol=1e-11)
    params = [x, *cell.parameters()]

    def grads(second: bool):
        z = deq(x)
        loss = (z ** 3).sum()
        g = torch.autograd.grad(loss, params, create_graph=second)
        if not second:
            return g
        return torch.autograd.grad(sum((gi ** 2).sum() for gi in g), params)

    for second in (False, True):
        ref = grads(second)
        with res.solver.attached(deq):
            got = grads(second)
        assert deq.last_info.forward.solver == "neural"
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_gradcheck_through_the_neural_solve(fitted):
    cell, res = fitted
    x = _inputs(1, 5).requires_grad_()
    A, U, b = (p.detach() for p in (cell.A, cell.U, cell.b))
    f = lambda z, x: torch.tanh(z @ A.T + x @ U.T + b)  # noqa: E731

    def z_star(x):
        return deqdiff.fixed_point(f, res.solver.initial_state(x), x, solver="neural", network=res.solver,
                                   tol=1e-12, backward_tol=1e-12)

    assert torch.autograd.gradcheck(z_star, (x,), atol=1e-6)


def test_untrained_network_is_anderson_bit_for_bit():
    cell = TanhCell(seed=7)
    x = _inputs(16, 6)
    g = lambda z: cell(z, x).detach()  # noqa: E731
    net = NeuralSolver(NeuralSolverConfig((N,), (D,), m=4))
    z0 = torch.zeros(16, N)
    with torch.no_grad():
        ref, info_ref = anderson(g, z0, tol=1e-10, max_iter=80, m=4)
        out, info = neural_solver(g, z0, tol=1e-10, max_iter=80, network=net)
    assert torch.equal(out, ref) and torch.equal(info.iterations, info_ref.iterations)
    assert info.extra["fallback_samples"] == 0


def test_checkpoint_round_trip(fitted, tmp_path):
    cell, res = fitted
    res.solver.save(tmp_path / "ns.pt", extra={"model": "tanh", "shape": (N,)})
    back = NeuralSolver.load(tmp_path / "ns.pt")
    assert back.config == res.solver.config and back.extra["shape"] == [N]
    for (k, v), (k2, v2) in zip(res.solver.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = _inputs(8, 7)
    g = lambda z: cell(z, x).detach()  # noqa: E731
    with torch.no_grad():
        runs = [neural_solver(g, s.initial_state(x), tol=1e-10, max_iter=50, network=s)[0] for s in (res.solver, back)]
    assert torch.equal(runs[0], runs[1])
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError):
        NeuralSolver.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        NeuralSolver.load(tmp_path / "none.pt")


def test_fallback_to_anderson_with_a_warning_when_proposals_stop_helping(fitted):
    cell, res = fitted
    broken = NeuralSolver(res.solver.config)
    broken.load_state_dict(res.solver.state_dict())
    with torch.no_grad():  # β ≈ 0: the proposals no longer move the state
        broken.mixer.net[-1].bias[-1] = -40.0
    x = _inputs(16, 8)
    g = lambda z: cell(z, x).detach()  # noqa: E731
    with torch.no_grad(), pytest.warns(FallbackWarning, match="16/16 samples"):
        z, info = neural_solver(g, broken.initial_state(x), tol=1e-10, max_iter=100, network=broken)
    assert info.all_converged and info.extra["fallback_samples"] == 16
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = neural_solver(g, res.solver.initial_state(x), tol=1e-10, max_iter=100, network=res.solver)
    assert info.all_converged and info.extra["fallback_samples"] == 0


def test_non_finite_initializer_starts_from_the_default_with_a_warning(fitted):
    cell, res = fitted
    broken = NeuralSolver(res.solver.config)
    with torch.no_grad():
        broken.initializer.net[-1].bias.fill_(float("nan"))
    deq = deqdiff.DEQ(cell, state_shape=N, tol=1e-8)
    x = _inputs(4, 9)
    with torch.no_grad(), broken.attached(deq), pytest.warns(FallbackWarning, match="initializer"):
        z = deq(x)
    assert bool(torch.isfinite(z).all()) and deq.last_info.forward.all_converged


def test_bad_use_is_refused():
    net = NeuralSolver(NeuralSolverConfig((N,), (D,), m=3))
    g = lambda z: torch.tanh(z)  # noqa: E731
    with pytest.raises(ValueError, match="network="):
        neural_solver(g, torch.zeros(2, N))
    with pytest.raises(ValueError, match="m=3"):
        neural_solver(g, torch.zeros(2, N), network=net, m=5)
    with pytest.raises(ValueError, match="unknowns"):
        neural_solver(g, torch.zeros(2, N + 1), network=net)
    with pytest.raises(ValueError, match="input"):
        net.initial_state(torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="patience"):
        NeuralSolverConfig((N,), (D,), patience=0)
    with pytest.raises(ValueError, match="unroll"):
        FitConfig(unroll=0)
