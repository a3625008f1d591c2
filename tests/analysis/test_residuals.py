
import pytest
import torch

from deqdiff.analysis.residuals import compare_initializations, relative_residuals, residual_curves
from deqdiff.analysis.trajectories import collect_trajectories
from tests.analysis.helpers import FCNet


class Affine(torch.nn.Module):
    """f(z, x) = a z + x: Picard residuals decay exactly like |a|^k."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, z, x):
        return self.a * z + x


def test_geometric_decay_of_a_known_contraction():
    import deqdiff

    a = 0.6
    model = deqdiff.DEQ(Affine(a), solver="fixed_point")
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    c = residual_curves(model, x, max_iter=25)
    assert c.rel.shape == (26, 5)
    # absolute residual ‖f(z_k) − z_k‖ = a^k ‖x‖ and ‖f(z_k)‖ = (1 − a^{k+1})/(1 − a) ‖x‖ from z_0 = 0
    k = torch.arange(26, dtype=torch.float64)[:, None]
    expected = a**k * (1 - a) / (1 - a ** (k + 1))
    assert torch.allclose(c.rel, expected.expand(-1, 5), rtol=1e-10, atol=0)
    ratios = c.rel[16:] / c.rel[15:-1]  # → a once ‖f(z_k)‖ has settled at ‖z*‖
    assert torch.allclose(ratios, torch.full_like(ratios, a), rtol=1e-3)


def test_trace_equals_eq_4_2_recomputed_from_iterates():
    model = FCNet(rho=0.8)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    c = residual_curves(model, x, solver="anderson", max_iter=15)
    traj = collect_trajectories(model, x, solver="anderson", max_iter=15)
    cell = model.deq.cell
    direct = relative_residuals(lambda z, x: cell(z, x), list(traj), x)
    assert torch.allclose(c.rel, direct, rtol=1e-8, atol=1e-14)


def test_curves_stop_at_convergence_and_bands_are_ordered():
    model = FCNet(rho=0.5)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(2))
    c = residual_curves(model, x, solver="fixed_point", tol=1e-6, max_iter=100)
    assert bool(c.converged.all())
    for s in range(20):
        k = int(c.iterations[s])
        assert c.rel[k, s] <= 1e-6 and torch.isnan(c.rel[k + 1:, s]).all()
    q = c.quantiles((0.1, 0.5, 0.9))
    assert bool((q[0] <= q[1]).all() and (q[1] <= q[2]).all())
    d = c.to_dict(max_curves=3)
    assert len(d["curves"]) == 3 and d["converged_fraction"] == 1.0


def test_compare_initializations_small_init_converges_faster():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    out = compare_initializations(lambda: FCNet(d=5, n=16, rho=0.5), x, solvers=("fixed_point",), max_iter=30)
    big, small = out["N(0,1) / fixed_point"], out["N(0,0.01) / fixed_point"]
    assert small.held[-1].median() < 1e-8
    assert big.held[-1].median() > 100 * small.held[-1].median()


def test_explicit_model_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="deqdiff.DEQ"):
        residual_curves(torch.nn.Linear(3, 3), torch.zeros(1, 3))
