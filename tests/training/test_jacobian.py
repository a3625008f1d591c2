"""Hutchinson estimate of ‖J_f‖_F² (Bai et al. 2021) vs the dense Jacobian."""

from __future__ import annotations

import pytest
import torch

from deqdiff.models.conv import ConvCell, ConvRepeat
from deqdiff.training import capture_equilibrium, hutchinson_frobenius
from tests.training.helpers import tiny_config
from deqdiff.training import build_model


def test_hutchinson_is_unbiased_for_each_sample():
    torch.manual_seed(0)
    cell = ConvCell(2, 4, groups=2, init_std=0.5).double()
    z, x = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    exact = []
    for s in range(2):
        J = torch.autograd.functional.jacobian(lambda v: cell(v[None], x[s:s + 1])[0], z[s])
        exact.append(float(J.reshape(18, 18).pow(2).sum()))
    g = torch.Generator().manual_seed(1)
    est = hutchinson_frobenius(cell, z, x, samples=4000, create_graph=False, generator=g)
    assert est.shape == (2,)
    for e, r in zip(est.tolist(), exact):
        assert e == pytest.approx(r, rel=0.08)  # 4000 samples: std of the mean ≈ 2-3 %


def test_penalty_has_gradients_for_cell_and_injection_and_capture_sees_the_solve():
    model = build_model(tiny_config(dtype="float64"), (1, 4, 4), 3)
    images = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with capture_equilibrium(model) as box:
        model(images)
    assert torch.equal(box["x"], model.stem(images))
    fz = model.cell(box["z"], box["x"]).detach()
    assert float((fz - box["z"].detach()).norm() / fz.norm()) < 1e-3  # z is the equilibrium
    penalty = hutchinson_frobenius(model.cell, box["z"], box["x"]).sum()
    penalty.backward()
    assert model.cell.conv1.weight.grad.abs().sum() > 0 and model.stem.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no equilibrium layer"):
        with capture_equilibrium(ConvRepeat(k=2)):
            pass
