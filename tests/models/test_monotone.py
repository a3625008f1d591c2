"""Monotone DEQ models (models/monotone.py, models/monotone_conv.py): parametrization,
engine integration (every derivative order), Lipschitz bounds, the model protocol."""

from __future__ import annotations

import pytest
import torch

from deqdiff.models import MonotoneDEQ, MonotoneLinear, fb_contraction_factor
from deqdiff.solvers import ConvergenceError

torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("seed", range(8))
def test_I_minus_W_is_m_strongly_monotone(seed):
    torch.manual_seed(seed)
    m = [0.01, 0.05, 0.3, 1.0][seed % 4]
    cell = MonotoneLinear(3, 20, m=m)
    with torch.no_grad():  # arbitrary (large) A, B
        cell.A.weight.mul_(1 + 3 * seed)
        cell.B.weight.mul_(1 + 5 * seed)
    W = cell.weight().detach()
    eig = torch.linalg.eigvalsh(torch.eye(20) - 0.5 * (W + W.T))
    assert float(eig.min()) >= m - 1e-9
    z = torch.randn(4, 20)
    assert torch.allclose(cell.multiply(z), z @ W.T, atol=1e-10)


@pytest.mark.parametrize("solver,backward", [("pr", "auto"), ("fb", "fb"), ("pr", "pr"), ("anderson", "pr")])
def test_gradcheck_and_gradgradcheck(solver, backward):
    torch.manual_seed(1)
    model = MonotoneDEQ(3, 4, 2, m=0.5, solver=solver, tol=1e-11, max_iter=5000, on_fail="raise",
                        backward_solver=backward, backward_tol=1e-11)
    x = torch.randn(2, 3, requires_grad=True)
    A = model.cell.A.weight
    assert torch.autograd.gradcheck(lambda x, A: model(x), (x, A))  # A is read from the model
    assert torch.autograd.gradgradcheck(lambda x: model(x), (x,))
    assert torch.autograd.gradgradcheck(lambda B: model(x.detach()), (model.cell.B.weight,))


def test_forward_mode_matches_reverse_mode():
    torch.manual_seed(2)
    model = MonotoneDEQ(4, 6, 3, m=0.2, tol=1e-12, max_iter=2000, on_fail="raise")
    x = torch.randn(3, 4)
    v = torch.randn(3, 4)
    _, jv = torch.func.jvp(lambda x: model(x), (x,), (v,))
    J = torch.autograd.functional.jacobian(lambda x: model(x), x)  # (3, 3, 3, 4)
    assert torch.allclose(jv, torch.einsum("abcd,cd->ab", J, v), atol=1e-9)


@pytest.mark.parametrize("solver", ["pr", "fb", "anderson", "broyden"])
def test_solvers_agree_on_z_star(solver):
    torch.manual_seed(4)
    model = MonotoneDEQ(16, 40, 10, m=0.1, tol=1e-10, max_iter=20_000, on_fail="raise")
    x = torch.randn(5, 16)
    ref = model.equilibrium(x, solver="pr")
    z = model.equilibrium(x, solver=solver)
    assert torch.allclose(z, ref, atol=1e-7)
    assert torch.allclose(z, torch.relu(model.cell.multiply(z) + model.cell.U(x)), atol=1e-7)
    assert model.deq.last_info.forward.all_converged


def test_lipschitz_bounds_hold_empirically():
    """‖z*‖ ≤ (‖U‖‖x‖ + ‖b‖)/m (Lemma 3.3.3) and ‖z₁* − z₂*‖ ≤ ‖U‖/m ‖x₁ − x₂‖ on random inputs."""
    for seed in range(5):
        torch.manual_seed(seed)
        m = [0.05, 0.2, 0.5, 1.0, 0.1][seed]
        model = MonotoneDEQ(10, 30, 2, m=m, tol=1e-10, max_iter=5000, on_fail="raise")
        if seed % 2:
            with torch.no_grad():
                model.cell.U.bias.zero_()  # the thesis's setting (no bias)
        x = 3 * torch.randn(64, 10)
        with torch.no_grad():
            z = model.equilibrium(x)
            assert torch.all(z.norm(dim=1) <= model.cell.state_norm_bound(x) * (1 + 1e-9))
            x2 = x + 0.1 * torch.randn_like(x) * (seed + 1)
            z2 = model.equilibrium(x2)
            lip = model.cell.lipschitz_bound()
            assert torch.all((z - z2).norm(dim=1) <= lip * (x - x2).norm(dim=1) * (1 + 1e-9))
            # the bound is meaningful: the tightest observed ratio is within the bound, not vacuous by 1e6
            assert float(((z - z2).norm(dim=1) / (x - x2).norm(dim=1)).max()) > lip * 1e-6


def test_fb_operator_contraction_empirically():
    """The FB operator z ↦ ReLU(z − α((I − W)z − c)) contracts by Proposition 3's factor."""
    torch.manual_seed(5)
    model = MonotoneDEQ(8, 25, 2, m=0.2)
    cell = model.cell
    L = cell.op_norm()
    x = torch.randn(1, 8)
    with torch.no_grad():
        c = cell.U(x)
        for frac in (0.25, 0.5, 0.9):
            alpha = frac * 2 * cell.m / L**2
            q = cell.fb_contraction_factor(alpha)
            assert q == pytest.approx(fb_contraction_factor(alpha, cell.m, L)) and q < 1
            T = lambda z: torch.relu(z - alpha * (z - cell.multiply(z) - c))  # noqa: E731
            z1, z2 = torch.randn(200, 25), torch.randn(200, 25)
            ratio = (T(z1) - T(z2)).norm(dim=1) / (z1 - z2).norm(dim=1)
            assert float(ratio.max()) <= q + 1e-12


def test_model_protocol_and_overrides():
    torch.manual_seed(7)
    model = MonotoneDEQ(64, 32, 10)
    x = torch.rand(6, 8, 8)  # images are flattened
    logits = model(x)
    assert logits.shape == (6, 10)
    info = model.deq.last_info.forward
    assert info.solver == "peaceman_rachford" and info.all_converged
    model(x, store_trajectory=True, tol=1e-8, solver="anderson", max_iter=300)
    info = model.deq.last_info.forward
    assert info.solver == "anderson" and info.trajectory is not None and info.tol == 1e-8
    model(x, solver="fb", alpha=None)
    assert model.deq.last_info.forward.solver == "forward_backward"
    with pytest.raises(ValueError, match="2m/L²"):
        model(x, solver="fb", alpha=100.0)
    with pytest.raises(ValueError, match="64 input features"):
        model(torch.rand(2, 10))
    with pytest.raises(ConvergenceError):
        model(x, solver="fb", tol=1e-14, max_iter=3, on_fail="raise")


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(9)
    model = MonotoneDEQ(16, 32, 3)
    x = torch.randn(48, 16)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
