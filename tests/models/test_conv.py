"""Convolutional DEQ of thesis eq. 4.1: implicit derivatives vs finite differences and vs
unrolled autodiff through the weight-tied repetition of the same cell."""

from __future__ import annotations

import pytest
import torch

from deqdiff.models.conv import ConvCell, ConvDEQ, ConvRepeat, WeightTied, repeat_from_deq
from tests.conftest import rel_err

TINY = dict(in_channels=1, image_size=4, num_classes=3, channels=4, hidden=4, groups=2, init_std=0.1)


def tiny_deq(**kw):
    torch.manual_seed(0)
    return ConvDEQ(**TINY, tol=1e-12, max_iter=200, on_fail="raise", **kw).double()


def test_cell_matches_eq_4_1_written_out():
    torch.manual_seed(0)
    cell = ConvCell(4, 8, groups=2, init_std=0.3).double()
    for norm in (cell.norm1, cell.norm2, cell.norm3):  # non-trivial affine parameters
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    z, x = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    gn = torch.nn.functional.group_norm
    conv = torch.nn.functional.conv2d
    y = gn(torch.relu(conv(z, cell.conv1.weight, padding=1)), 2, cell.norm1.weight, cell.norm1.bias)
    inner = gn(x + conv(y, cell.conv2.weight, padding=1), 2, cell.norm2.weight, cell.norm2.bias)
    ref = gn(torch.relu(z + inner), 2, cell.norm3.weight, cell.norm3.bias)
    assert torch.allclose(cell(z, x), ref, atol=1e-12)


def test_gradcheck_inputs_and_parameters_float64():
    model = tiny_deq()
    images = torch.randn(2, 1, 4, 4, requires_grad=True)
    w1 = model.cell.conv1.weight

    def fn(images, w1_value):
        # w1_value replaces the module parameter, so gradcheck differentiates through it
        return torch.func.functional_call(model, {"core.cell.conv1.weight": w1_value}, (images,))

    assert torch.autograd.gradcheck(fn, (images, w1.detach().clone().requires_grad_()), eps=1e-6, atol=1e-6, fast_mode=True)
    assert model.deq.last_info.forward.all_converged


def test_implicit_gradients_equal_unrolled_repeat_k_to_second_order():
    model = tiny_deq()
    unrolled = repeat_from_deq(model, 400)  # same weights: unrolled iteration of the contractive cell
    images = torch.randn(2, 1, 4, 4, requires_grad=True)
    params = list(model.parameters())

    def second_order(net):
        out = net(images)
        (g,) = torch.autograd.grad(out[:, 0].sum(), images, create_graph=True)
        return torch.autograd.grad((g**2).sum() + out.pow(2).sum(), params)

    assert rel_err(model(images), unrolled(images)) < 1e-10
    for a, b in zip(second_order(model), second_order(unrolled)):
        assert rel_err(a, b) < 1e-7


def test_repeat_k_equals_manual_repetition():
    torch.manual_seed(1)
    net = ConvRepeat(**TINY, k=3).double()
    images = torch.randn(2, 1, 4, 4)
    x = net.stem(images)
    z = torch.zeros_like(x)
    for _ in range(3):
        z = net.cell(z, x)
    assert torch.equal(net(images), net.head(z))
    net(images, store_trajectory=True)
    assert len(net.core.last_trajectory) == 4 and torch.equal(net.core.last_trajectory[-1], z)


def test_deq_and_repeat_share_state_dict_layout():
    deq, rep = tiny_deq(), ConvRepeat(**TINY, k=4).double()
    rep.load_state_dict(deq.state_dict())
    images = torch.randn(2, 1, 4, 4)
    assert torch.equal(rep(images), repeat_from_deq(deq, 4)(images))
    assert not hasattr(rep, "deq") and hasattr(deq, "deq")


def test_solver_overrides_reach_the_solve():
    model = tiny_deq()
    images = torch.randn(2, 1, 4, 4)
    model(images, store_trajectory=True, tol=1e-3)
    info = model.deq.last_info.forward
    assert info.trajectory is not None and info.tol == 1e-3
    assert float(info.rel_residual.max()) <= 1e-3


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="divisible by the number of groups"):
        ConvCell(6, 8, groups=4)
    with pytest.raises(ValueError, match="not divisible by the pooling size"):
        ConvDEQ(image_size=7)
    with pytest.raises(ValueError, match="integer >= 1"):
        WeightTied(ConvCell(4, 4, groups=2), 0)
