import torch

from deqdiff.analysis.trajectories import collect_trajectories, pca_fit, project_trajectories, trajectories_over_training
from tests.analysis.helpers import FCNet


def test_pca_recovers_a_planted_plane():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g))[0].T  # (2, 10) orthonormal
    coeff = torch.randn(500, 2, generator=g) * torch.tensor([3.0, 1.0])
    pts = coeff @ basis + 5.0 + 1e-6 * torch.randn(500, 10, generator=g)
    proj = pca_fit(pts)
    assert torch.allclose(proj.components @ proj.components.T, torch.eye(2), atol=1e-10)
    # the fitted plane is the planted one
    assert torch.allclose((proj.components @ basis.T).det().abs(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)
    assert proj.explained.sum() > 0.999999


def test_trajectories_start_at_init_and_end_at_fixed_point():
    with torch.random.fork_rng():  # the weights must not depend on which tests ran before
        torch.manual_seed(0)
        model = FCNet(d=5, n=6, rho=0.5)
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    traj = collect_trajectories(model, x, solver="fixed_point", max_iter=60)
    K = traj.shape[0] - 1
    assert traj.shape[1:] == (9, 6) and 1 <= K <= 60
    if K < 60:  # tol = 0 stops early only where every row reached its fixed point to rounding
        with torch.no_grad():
            torch.testing.assert_close(model.deq.cell(traj[-1], x), traj[-1], atol=1e-14, rtol=0)
    assert torch.equal(traj[0], torch.zeros(9, 6))
    with torch.no_grad():
        z = model.deq(x)
    assert torch.allclose(traj[-1], z, atol=1e-10)
    coords, proj = project_trajectories(traj)
    assert coords.shape == (K + 1, 9, 2)
    assert torch.allclose(coords, (traj.double() - proj.mean) @ proj.components.T)


def test_trajectories_over_training_reports_each_checkpoint():
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    res = trajectories_over_training({"a": FCNet(), "b": FCNet(rho=0.9)}, x, max_iter=10)
    assert set(res) == {"a", "b"}
    assert res["a"]["coords"].shape == (11, 5, 2) and res["a"]["mean_step"].shape == (10,)
