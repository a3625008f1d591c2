"""Second derivatives through cells with layer norm, whose second-order forward mode in
PyTorch is wrong: the derivatives API must agree with double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deqdiff.derivatives import LossHessian
from deqdiff.derivatives._problem import Equilibrium
import deqdiff


def _cell(z, W, x):
    return F.layer_norm(0.5 * torch.tanh(z @ W.T) + x, (z.shape[-1],))


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.3 * torch.randn(4, 4, generator=g)
    x = torch.randn(3, 4, generator=g)
    return W, x


def test_pytorch_forward_mode_of_layer_norm_is_still_wrong_at_second_order():
    # why deqdiff avoids it; if this starts failing, PyTorch has fixed it (the workaround stays correct)
    z, a, lam = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    g = lambda v: F.layer_norm(torch.tanh(v), (4,))  # noqa: E731
    zz = z.clone().requires_grad_()
    ref = torch.autograd.grad((torch.autograd.grad(g(zz), zz, lam, create_graph=True)[0] * a).sum(), zz)[0]
    _, pull = torch.func.vjp(lambda v: torch.func.jvp(g, (v,), (a,))[1], z)
    assert (pull(lam)[0] - ref).norm() > 1e-3 * ref.norm()


def test_loss_hessian_product_equals_double_backward_through_the_fixed_point():
    W, x = _setup()
    z = deqdiff.fixed_point(_cell, torch.zeros_like(x), W, x, tol=1e-13)
    loss = lambda zz: (zz.sin() ** 2).sum()  # noqa: E731
    H = LossHessian(_cell, z.detach(), (W, x), loss, argnums=0, tol=1e-13)
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def total(Wf):
        return loss(deqdiff.fixed_point(_cell, torch.zeros_like(x), Wf, x, tol=1e-13))

    ref = torch.autograd.functional.hvp(total, W, v)[1]
    out = H.hvp((v,))
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.xfail(strict=True, reason="known limitation: D²f[a, b] through layer_norm needs second-order forward "
                   "mode (wrong in PyTorch 2.13) or a third reverse pass, which gave wrong values too")
def test_second_directional_derivative_of_the_cell():
    W, x = _setup(2)
    z = deqdiff.fixed_point(_cell, torch.zeros_like(x), W, x, tol=1e-13)
    eq = Equilibrium(_cell, z.detach(), (W, x), argnums=(0,))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out = eq.f_second((a, [None, None]), (b, [None, None]))
    zz = z.detach().clone().requires_grad_()
    lam = torch.randn(3, 4)
    ga = torch.autograd.grad(_cell(zz, W, x), zz, lam, create_graph=True)[0]
    ref = (torch.autograd.grad((ga * a).sum(), zz)[0] * b).sum()
    torch.testing.assert_close((out * lam).sum(), ref, rtol=1e-9, atol=1e-12)
