"""The neural solver's convolutional initializer (Bai, Koltun & Kolter 2022: a small network on the
injection with the state's spatial structure) for image states and flat multiscale states (MDEQ
branches), its least-squares output heads, the initializer-only fitting steps and the fit's
wall-clock budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import deqdiff
from deqdiff.solvers.anderson import anderson
from deqdiff.solvers.neural import Initializer, NeuralSolver, NeuralSolverConfig, neural_solver
from deqdiff.solvers.neural_fit import FitConfig, fit_neural_solver, ground_truth

C_IN, H = 3, 4
LAYOUT = ((2, 4, 4), (3, 2, 2))  # a full-resolution and a half-resolution branch, flattened and concatenated
N_FLAT = sum(math.prod(b) for b in LAYOUT)


class ConvCell(nn.Module):
    """f(z, x) = tanh(K ⋆ z + W ⋆ x) on (2, 4, 4) images, the convolution z ↦ K ⋆ z scaled to
    spectral norm 0.97 (slow convergence, where the start matters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        k = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
        basis = torch.eye(2 * H * H, dtype=torch.float64).reshape(-1, 2, H, H)
        op = nn.functional.conv2d(basis, k, padding=1).reshape(2 * H * H, -1)  # the convolution as a matrix
        self.K = nn.Parameter(0.97 * k / torch.linalg.matrix_norm(op, 2))
        self.W = nn.Parameter(torch.randn(2, C_IN, 3, 3, generator=gen, dtype=torch.float64) / 3)

    def forward(self, z, x):
        return torch.tanh(nn.functional.conv2d(z, self.K, padding=1) + nn.functional.conv2d(x, self.W, padding=1))


class FlatCell(nn.Module):
    """A contractive map on flat multiscale states (B, 44): tanh(A z + U vec(x))."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(N_FLAT, N_FLAT, generator=gen)
        self.A = nn.Parameter(0.85 * a / torch.linalg.matrix_norm(a, 2))
        self.U = nn.Parameter(torch.randn(N_FLAT, C_IN * H * H, generator=gen) / (C_IN * H * H) ** 0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.A.T + x.flatten(1) @ self.U.T)


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0], 2, H, H)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C_IN, H, H, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", [None, LAYOUT])
def test_least_squares_heads_recover_a_target_the_heads_can_represent(layout):
    """refit_output solves for every branch's 1×1 head (after the global correction) exactly."""
    torch.manual_seed(0)
    state = (2, H, H) if layout is None else (N_FLAT,)
    ini = Initializer((C_IN, H, H), state, hidden=6, layout=layout, rank=4)
    assert ini.conv and len(ini.heads) == (1 if layout is None else 2)
    with torch.no_grad():
        nn.init.normal_(ini.up.weight)
        for head in ini.heads:
            nn.init.normal_(head.weight), nn.init.normal_(head.bias)
    x = _images(64, 1)
    with torch.no_grad():
        target = ini(x)
    assert target.shape == (64, *state)
    other = copy.deepcopy(ini)
    with torch.no_grad():
        for head in other.heads:
            head.weight.zero_(), head.bias.zero_()
    other.refit_output(x, target, ridge=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(other(x), target, rtol=1e-8, atol=1e-8)


def test_branches_follow_the_layout_and_pooling():
    """Branch i of the output depends on the trunk features averaged over s_i × s_i blocks."""
    torch.manual_seed(1)
    ini = Initializer((C_IN, H, H), (N_FLAT,), hidden=5, layout=LAYOUT, rank=0)
    x = _images(3, 2)
    with torch.no_grad():
        out = ini(x)
        h = ini.net(ini._standardized(x))
        coarse = ini.heads[1](nn.functional.avg_pool2d(h, 2)).flatten(1)
    torch.testing.assert_close(out[:, 2 * H * H:], coarse)


def test_fit_on_a_conv_deq_with_initializer_steps_and_a_round_trip(tmp_path):
    cell = ConvCell().requires_grad_(False)
    res = fit_neural_solver(cell, _images(128, 3), _zeros,
                            config=NeuralSolverConfig((1,), (1,), hidden=16, init_hidden=8, init_rank=8),
                            fit=FitConfig(steps=15, batch=32, unroll=4, init_steps=100, init_batch=64, lr=1e-2,
                                          gt_tol=1e-10))
    ns = res.solver
    assert ns.initializer.conv and res.init_steps_done == 100 and res.steps_done == 15
    assert set(res.phases) == {"ground_truth", "ridge", "init", "unrolled", "final"}
    assert res.init_error < 0.2, res.init_error  # held out; the zero start is at 1
    x = _images(64, 4)
    g = lambda z: cell(z.reshape(-1, 2, H, H), x).reshape(z.shape[0], -1)  # noqa: E731
    with torch.no_grad():
        z0 = ns.initial_state(x).reshape(64, -1)
        z, info = neural_solver(g, z0, tol=1e-8, max_iter=100, network=ns)
        exact, ok = ground_truth(cell, x, torch.zeros(64, 2, H, H), tol=1e-12)
        _, loose = neural_solver(g, z0, tol=1e-3, max_iter=100, network=ns)
        _, ref = anderson(g, torch.zeros_like(z0), tol=1e-3, max_iter=100, m=ns.m)
    assert info.all_converged and bool(ok.all())
    torch.testing.assert_close(z.reshape(exact.shape), exact, rtol=0, atol=1e-6)
    # measured 4.75 vs 5.67 iterations (this small cell converges in a few steps from anywhere)
    assert float(loose.iterations.double().mean()) < 0.9 * float(ref.iterations.double().mean())
    ns.save(tmp_path / "ns.pt")
    back = NeuralSolver.load(tmp_path / "ns.pt")
    assert back.config == ns.config
    with torch.no_grad():
        assert torch.equal(back.initial_state(x), ns.initial_state(x))


def test_fit_on_a_multiscale_flat_state_uses_the_branch_heads():
    cell = FlatCell().requires_grad_(False)
    x_fit = _images(96, 5)
    res = fit_neural_solver(cell, x_fit, lambda x: x.new_zeros(x.shape[0], N_FLAT),
                            config=NeuralSolverConfig((1,), (1,), hidden=16, init_hidden=8, init_rank=8),
                            fit=FitConfig(steps=5, batch=32, unroll=3, init_steps=60, lr=1e-2, gt_tol=1e-10),
                            state_layout=LAYOUT)
    ns = res.solver
    assert ns.config.state_layout == LAYOUT and ns.initializer.conv and len(ns.initializer.heads) == 2
    deq = deqdiff.DEQ(cell, state_shape=N_FLAT, tol=1e-8)
    x = _images(32, 6)
    with torch.no_grad():
        ref = deq(x)
        evals_ref = float(deq.last_info.forward.iterations.double().mean())
        with ns.attached(deq):
            z = deq(x)
        assert deq.last_info.forward.solver == "neural" and deq.last_info.forward.all_converged
        evals = float(deq.last_info.forward.iterations.double().mean())
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-6)
    assert evals < evals_ref


def test_mixer_rule_is_chosen_on_held_out_samples():
    cell = ConvCell().requires_grad_(False)
    res = fit_neural_solver(cell, _images(40, 8), _zeros,
                            config=NeuralSolverConfig((1,), (1,), hidden=8, init_hidden=4),
                            fit=FitConfig(steps=3, batch=8, unroll=2, init_steps=5, gt_tol=1e-8, select_tol=1e-6))
    rule = res.mixer_rule
    order = ["fitted_steps", "every_step", "none"]  # ties go to the first
    assert rule["samples"] == 8 and set(rule["f_evals"]) == set(order)
    best = min(order, key=lambda k: (rule["f_evals"][k], order.index(k)))
    assert rule["kept"] == best
    assert res.solver.config.mixer_steps == {"fitted_steps": 2, "every_step": None, "none": 0}[best]


def test_time_budget_stops_the_fit_and_records_the_steps_done():
    cell = ConvCell().requires_grad_(False)
    res = fit_neural_solver(cell, _images(32, 7), _zeros,
                            config=NeuralSolverConfig((1,), (1,), hidden=8, init_hidden=4),
                            fit=FitConfig(steps=10_000, batch=8, unroll=2, init_steps=10_000, gt_tol=1e-6,
                                          time_budget_s=0.5))
    assert res.init_steps_done < 10_000 and res.steps_done < 10_000
    assert len(res.history) == res.steps_done


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="init_steps"):
        FitConfig(init_steps=-1)
    with pytest.raises(ValueError, match="time_budget_s"):
        FitConfig(time_budget_s=0.0)
    with pytest.raises(ValueError, match="init_lr"):
        FitConfig(init_lr=float("nan"))
    with pytest.raises(ValueError, match="select_tol"):
        FitConfig(select_tol=-1.0)
    with pytest.raises(ValueError, match="init_batch"):
        FitConfig(init_batch=0)
    with pytest.raises(ValueError, match="init_rank"):
        NeuralSolverConfig((4,), (2,), init_rank=-1)
    with pytest.raises(ValueError, match="state_layout"):
        NeuralSolverConfig((N_FLAT + 1,), (C_IN, H, H), state_layout=LAYOUT)
