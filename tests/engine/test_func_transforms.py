"""Forward mode and torch.func transforms over ``fixed_point`` against unrolled autodiff."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import deqdiff
from tests.conftest import make_problem, rel_err, tanh_cell, unrolled


@pytest.fixture
def problem(gen):
    z0, (A, B, x, b) = make_problem(gen, n=4, m=3)
    return z0, A.detach(), B.detach(), x.detach(), b.detach()


def solve(z0, A, B, x, b):
    return deqdiff.fixed_point(tanh_cell, z0, A, B, x, b, tol=1e-12, max_iter=500)


def reference(z0, A, B, x, b):
    return unrolled(tanh_cell, z0, A, B, x, b)


TRANSFORMS = {
    "jvp": lambda fn, z0, A, B, x, b: jvp(lambda x: fn(z0, A, B, x, b), (x,), (torch.ones_like(x),))[1],
    "jvp_in_A": lambda fn, z0, A, B, x, b: jvp(lambda A: fn(z0, A, B, x, b), (A,), (torch.ones_like(A),))[1],
    "jacfwd": lambda fn, z0, A, B, x, b: jacfwd(lambda x: fn(z0, A, B, x, b))(x),
    "jacrev": lambda fn, z0, A, B, x, b: jacrev(lambda A: fn(z0, A, B, x, b))(A),
    "hessian": lambda fn, z0, A, B, x, b: hessian(lambda x: (fn(z0, A, B, x, b) ** 2).sum())(x),
    "jacrev_jacrev": lambda fn, z0, A, B, x, b: jacrev(jacrev(lambda x: fn(z0, A, B, x, b)))(x),
    "jacrev_jacfwd": lambda fn, z0, A, B, x, b: jacrev(jacfwd(lambda x: fn(z0, A, B, x, b)))(x),
    "vmap": lambda fn, z0, A, B, x, b: vmap(lambda x: fn(z0, A, B, x, b))(torch.stack([x, 2 * x, -x])),
    "vmap_jacrev": lambda fn, z0, A, B, x, b: vmap(jacrev(lambda x: fn(z0, A, B, x, b)))(torch.stack([x, -x])),
    "vmap_over_weights": lambda fn, z0, A, B, x, b: vmap(lambda A: fn(z0, A, B, x, b))(torch.stack([A, 0.5 * A])),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_matches_unrolled(problem, name):
    got = TRANSFORMS[name](solve, *problem)
    ref = TRANSFORMS[name](reference, *problem)
    assert rel_err(got, ref) < 1e-9


def test_forward_ad_dual_tensors(problem):
    z0, A, B, x, b = problem
    t = torch.randn_like(x)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(solve(z0, A, B, fwAD.make_dual(x, t), b)).tangent
        ref = fwAD.unpack_dual(reference(z0, A, B, fwAD.make_dual(x, t), b)).tangent
    assert rel_err(got, ref) < 1e-10


def test_reverse_over_forward_pinn_pattern(problem):
    """dz*/dx·v by forward mode, then the gradient of a loss on it w.r.t. the weights."""
    z0, A, B, x, b = problem
    A = A.clone().requires_grad_()

    def grad_of_tangent_loss(fn):
        _, dz = jvp(lambda x: fn(z0, A, B, x, b), (x,), (torch.ones_like(x),))
        return torch.autograd.grad((dz**2).sum(), A)[0]

    assert rel_err(grad_of_tangent_loss(solve), grad_of_tangent_loss(reference)) < 1e-9


def test_forward_over_forward_is_refused_loudly(problem):
    z0, A, B, x, b = problem
    with pytest.raises(NotImplementedError, match="197867"):
        jacfwd(jacfwd(lambda x: solve(z0, A, B, x, b)))(x)
