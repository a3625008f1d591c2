"""Burgers / heat physics-informed DEQ: third-order implicit derivatives against unrolled
autodiff, the reference solvers against each other and against the analytic heat solution,
bad configurations, a short training run and the CLI entry points."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from deqdiff.physics import burgers as B


def _pair(n=6, rho=0.3, seed=0):
    """The same small contractive model twice: implicit (tight tol) and unrolled (200 its)."""
    imp = B.PDEDEQ(n, 1.3, a_scale=rho, tol=1e-13, max_iter=300, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(seed))
    unr = B.PDEDEQ(n, 1.3, mode="unrolled", unroll_iters=200, dtype=torch.float64)
    with torch.no_grad():
        imp.D.copy_(torch.tensor([0.3, -0.2]))
    unr.load_state_dict(imp.state_dict())
    return imp, unr


def _points(k=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(k, generator=g, dtype=torch.float64) - 1, 1.3 * torch.rand(k, generator=g, dtype=torch.float64)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_derivative_terms_match_unrolled():
    imp, unr = _pair()
    x, t = _points()
    a, b = B.pde_terms(imp, x, t), B.pde_terms(unr, x, t)
    for k in ("u", "u_t", "u_x", "u_xx"):
        assert _rel(a[k], b[k]) <= 1e-10, k


def test_derivative_terms_match_finite_differences():
    """u_x, u_xx, u_t against central differences of u itself (independent of autodiff)."""
    imp, _ = _pair()
    x, t = _points()
    d = B.pde_terms(imp, x, t)
    h = 1e-4
    with torch.no_grad():
        u = lambda xx, tt: imp(xx, tt)  # noqa: E731
        ux = (u(x + h, t) - u(x - h, t)) / (2 * h)
        uxx = (u(x + h, t) - 2 * u(x, t) + u(x - h, t)) / h ** 2
        ut = (u(x, t + h) - u(x, t - h)) / (2 * h)
    assert _rel(d["u_x"], ux) < 1e-7
    assert _rel(d["u_t"], ut) < 1e-7
    assert _rel(d["u_xx"], uxx) < 1e-5


@pytest.mark.parametrize("problem", ["burgers", "heat"])
def test_loss_and_weight_gradient_match_unrolled(problem):
    """The full physics-informed loss (third order: ∇_θ of a loss on u_xx) vs unrolled."""
    imp, unr = _pair(seed=3)
    cfg = B.PDEConfig(problem=problem, nu=0.05, T=1.3, kappa=0.5)
    g = torch.Generator().manual_seed(5)
    pts = B.sample_points(B.PDEConfig(n_collocation=9, n_initial=4, n_boundary=4, T=1.3), g, torch.float64, "cpu")
    la, _ = B.pde_loss(imp, cfg, pts)
    lb, _ = B.pde_loss(unr, cfg, pts)
    assert abs(la.item() - lb.item()) <= 1e-10 * abs(lb.item())
    ga = torch.autograd.grad(la, list(imp.parameters()))
    gb = torch.autograd.grad(lb, list(unr.parameters()))
    for name, p, q in zip([n for n, _ in imp.named_parameters()], ga, gb):
        assert _rel(p, q) <= 1e-8, name


def test_residual_gradient_detects_a_wrong_term():
    """The comparison above can fail: dropping the ν·u_xx term changes the gradient."""
    imp, unr = _pair()
    x, t = _points()
    ra = (B.residual(B.pde_terms(imp, x, t), 0.0, 1.0) ** 2).mean()
    rb = (B.residual(B.pde_terms(unr, x, t), 0.1, 1.0) ** 2).mean()
    ga = torch.autograd.grad(ra, imp.A)[0]
    gb = torch.autograd.grad(rb, unr.A)[0]
    assert _rel(ga, gb) > 1e-3


def test_cole_hopf_matches_finite_differences():
    nu = 0.1 / math.pi
    x, t, u_fd = B.reference_fd(nu, 1.0, nx=401, nt=5)
    X, T = np.meshgrid(x, t)
    u = B.reference_solution(X, T, nu)
    assert np.linalg.norm(u - u_fd) / np.linalg.norm(u) < 3e-4
    assert np.allclose(u[0], -np.sin(np.pi * x), atol=1e-12)  # t = 0: the initial condition


def test_cole_hopf_symmetry_boundaries_and_decay():
    nu = 0.01 / math.pi
    x = np.linspace(-1, 1, 81)
    for t in (0.2, 0.6, 1.0):
        u = B.reference_solution(x, t, nu)
        assert np.allclose(u, -u[::-1], atol=1e-10)  # odd in x
        assert abs(u[0]) < 1e-10 and abs(u[-1]) < 1e-10  # u(±1, t) = 0
    e = [np.sum(B.reference_solution(x, t, nu) ** 2) for t in (0.0, 0.3, 0.6, 0.9)]
    assert all(a > b for a, b in zip(e, e[1:]))  # energy decays
    # steep front at x = 0 for the classic ν: |u_x| ≈ 1/(... ν) large
    u = B.reference_solution(np.array([-1e-3, 1e-3]), 0.6, nu)
    assert (u[0] - u[1]) / 2e-3 > 100


def test_heat_reference_is_analytic_and_matches_fd():
    x, t, u_fd = B.reference_fd(0.05, 1.0, nx=401, nt=5, convection=0.0)
    X, T = np.meshgrid(x, t)
    u = B.reference_solution(X, T, 0.05, convection=0.0)
    assert np.allclose(u, -np.sin(np.pi * X) * np.exp(-0.05 * np.pi ** 2 * T))
    assert np.abs(u - u_fd).max() < 1e-4


@pytest.mark.parametrize("bad, match", [
    (dict(nu=-0.1), "nu"), (dict(T=0.0), "T"), (dict(T=float("nan")), "T"), (dict(problem="kdv"), "unknown problem"),
    (dict(epochs=-1), "epochs"), (dict(n_states=0), "n_states"), (dict(mode="magic"), "mode"),
    (dict(lam_pde=-1.0), "lam_pde"), (dict(dtype="float16"), "dtype"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        B.PDEConfig(**bad).validate()


def test_bad_reference_inputs():
    with pytest.raises(ValueError, match="nu"):
        B.reference_solution(0.0, 0.5, nu=0.0)
    with pytest.raises(ValueError, match="t must be"):
        B.reference_solution(0.0, -0.5, nu=0.1)


def _args(tmp_path, *extra, problem="burgers"):
    p = argparse.ArgumentParser()
    B.add_arguments(p, problem=problem)
    return p.parse_args(["--out", str(tmp_path), "--no-progress", "--states", "8", "--collocation", "64",
                         "--initial-points", "16", "--boundary-points", "16", *extra])


def test_short_training_reduces_loss():
    cfg = B.PDEConfig(epochs=40, n_states=8, n_collocation=64, n_initial=32, n_boundary=32, lr=2e-2)
    _, hist, _ = B.train(cfg, log_every=1)
    assert np.isfinite(hist["loss"]).all()
    assert np.mean(hist["loss"][-5:]) < 0.5 * np.mean(hist["loss"][:5])


def test_resume_is_bit_identical(tmp_path):
    cfg = B.PDEConfig(epochs=6, n_states=6, n_collocation=32, n_initial=8, n_boundary=8)
    m_full, h_full, _ = B.train(cfg, log_every=1)
    m_half, h_half, ex = B.train(cfg, log_every=1, until=3)
    state = B.checkpoint(m_half, h_half, ex, cfg)
    torch.save(state, tmp_path / "ck.pt")
    m_res, h_res, _ = B.train(cfg, state=torch.load(tmp_path / "ck.pt", weights_only=False), log_every=1)
    for p, q in zip(m_full.parameters(), m_res.parameters()):
        assert torch.equal(p, q)
    assert h_full["loss"] == h_res["loss"]


def test_cli_run_writes_results_and_figures(tmp_path):
    args = _args(tmp_path, "--epochs", "3", problem="heat")
    assert B.run(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["problem"] == "heat" and math.isfinite(res["rel_l2"])
    for name in ("heat_solution.png", "heat_slices.png", "heat_loss.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    # resuming with different physics is refused, naming the field
    with pytest.raises(ValueError, match="nu"):
        B.run(_args(tmp_path, "--epochs", "4", "--nu", "0.2", "--resume", str(tmp_path / "checkpoint.pt"), problem="heat"))


def test_cli_rejects_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="T must be"):
        B.run(_args(tmp_path, "--T", "-1"))


def test_unrolled_mode_stops_at_the_same_rule():
    """Unrolled by the stopping rule (no fixed K) agrees with the implicit model to ~tol."""
    imp, _ = _pair()
    unr = B.PDEDEQ(6, 1.3, mode="unrolled", tol=1e-10, dtype=torch.float64)
    unr.load_state_dict(imp.state_dict())
    x, t = _points()
    a, b = B.pde_terms(imp, x, t), B.pde_terms(unr, x, t)
    assert 5 < unr.last_iterations < 100
    for k in ("u", "u_x", "u_xx"):
        assert _rel(a[k], b[k]) < 1e-8, k


def test_mlp_baseline_trains_with_the_same_loss():
    cfg = B.PDEConfig(model="mlp", epochs=30, n_collocation=64, n_initial=32, n_boundary=32, lr=1e-2)
    model, hist, _ = B.train(cfg, log_every=1)
    assert isinstance(model, B.PDEMLP)
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])
    ev = B.evaluate(model, cfg)
    assert math.isfinite(ev["rel_l2"])


def test_bad_model_and_problem_names():
    with pytest.raises(ValueError, match="unknown model"):
        B.PDEConfig(model="cnn").validate()
    with pytest.raises(ValueError, match="unknown problem"):
        B.add_arguments(argparse.ArgumentParser(), problem="kdv")
