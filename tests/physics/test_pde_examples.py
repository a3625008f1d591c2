"""Burgers and heat written in the PDE interface give the same loss terms and weight gradients as
the hand-written module deqdiff.physics.burgers on the same weights and points, and the same
reference solutions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqdiff.physics import burgers as B
from deqdiff.physics.coordinate_models import CoordinatePIDEQ
from deqdiff.physics.pde_examples import burgers_problem, heat_problem


def _twins(T=1.0, n=6):
    old = B.PDEDEQ(n, T, tol=1e-12, a_scale=0.5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old.D.copy_(torch.tensor([0.3, -0.2]))
    new = CoordinatePIDEQ([(-1.0, 1.0), (0.0, T)], 1, n, tol=1e-12)
    with torch.no_grad():
        new.cell.A.copy_(old.A)
        new.cell.U.copy_(old.U)
        new.cell.b.copy_(old.b)
        new.C.weight.copy_(old.C[None])
        new.C.bias.zero_()
        new.D.weight.copy_(old.D[None])
    return old, new


@pytest.mark.parametrize("problem", ["burgers", "heat"])
def test_interface_loss_and_gradient_equal_the_hand_written_module(problem):
    cfg = B.PDEConfig(problem=problem, n_collocation=12, n_initial=5, n_boundary=4, tol=1e-12)
    old, new = _twins()
    pts = B.sample_points(cfg, torch.Generator().manual_seed(1), torch.float64, "cpu")
    loss_old, parts = B.pde_loss(old, cfg, pts)
    pb = burgers_problem(cfg.nu) if problem == "burgers" else heat_problem(cfg.nu)
    pb.solve_options = {"tol": 1e-12}
    batch = {"pde": torch.stack([pts["x_col"], pts["t_col"]], 1),
             "initial": torch.stack([pts["x_ic"], torch.zeros_like(pts["x_ic"])], 1),
             "dirichlet_x": torch.stack([pts["x_bc"], pts["t_bc"]], 1)}
    out = pb.loss(new, batch)
    assert out.terms["pde"] == pytest.approx(parts["pde"], rel=1e-10)
    assert out.terms["initial"] == pytest.approx(parts["ic"], rel=1e-10)
    assert out.terms["dirichlet_x"] == pytest.approx(parts["bc"], rel=1e-10)
    g_old = torch.autograd.grad(loss_old, [old.A, old.U, old.b, old.C, old.D])
    g_new = torch.autograd.grad(out.total, [new.cell.A, new.cell.U, new.cell.b, new.C.weight, new.D.weight])
    for a, b in zip(g_old, g_new):
        assert torch.allclose(a.reshape(b.shape), b, rtol=1e-8, atol=1e-12)


def test_references_are_the_modules():
    X = np.array([[0.3, 0.5], [-0.7, 0.9]])
    nu = 0.1 / np.pi
    assert np.allclose(burgers_problem(nu).reference(X), B.reference_solution(X[:, 0], X[:, 1], nu, 1.0))
    assert np.allclose(heat_problem(nu).reference(X), -np.sin(np.pi * X[:, 0]) * np.exp(-nu * np.pi ** 2 * X[:, 1]))
