"""Property tests over random contractive problems: implicit derivatives agree with dense
IFT formulas, batches agree with single samples, whatever the size and contraction."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqdiff
from tests.conftest import contractive_matrix, rel_err

problems = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**31 - 1),
        n=st.integers(1, 8),
        batch=st.integers(1, 5),
        rho=st.floats(0.05, 0.9),
        solver=st.sampled_from(["fixed_point", "anderson", "broyden"]),
        backward=st.sampled_from(["auto", "gmres", "bicgstab"]),
    )
)


def build(p):
    g = torch.Generator().manual_seed(p["seed"])
    A = contractive_matrix(p["n"], p["rho"], g)
    x = torch.randn(p["batch"], p["n"], generator=g)
    return A, x


def f(z, A, x):
    return torch.tanh(z @ A.T + x)


@settings(max_examples=25, deadline=None)
@given(problems)
def test_vjp_matches_dense_ift(p):
    A, x = build(p)
    A.requires_grad_()
    x.requires_grad_()
    z = deqdiff.fixed_point(f, torch.zeros_like(x), A, x, solver=p["solver"], tol=1e-12, max_iter=2000,
                            batch_ndim=1, backward_solver=p["backward"])
    u = torch.randn(z.shape, generator=torch.Generator().manual_seed(p["seed"] + 1))
    gA, gx = torch.autograd.grad(z, (A, x), u)
    with torch.no_grad():
        D = 1 - z**2  # f' at z*, per sample
        J = D[:, :, None] * A  # ∂f/∂z per sample
        w = torch.linalg.solve((torch.eye(p["n"]) - J).transpose(1, 2), u)  # (I − J)ᵀ w = u
        ref_x = D * w
        ref_A = torch.einsum("bi,bj->ij", D * w, z)
    assert rel_err(gx, ref_x) < 1e-8
    assert rel_err(gA, ref_A) < 1e-8


@settings(max_examples=15, deadline=None)
@given(problems)
def test_batch_equals_single_samples_to_second_order(p):
    A, x = build(p)
    A.requires_grad_()
    opts = dict(solver=p["solver"], tol=1e-12, max_iter=2000, backward_solver=p["backward"])

    def second(zs):
        (gA,) = torch.autograd.grad((zs**3).sum(), A, create_graph=True)
        return torch.autograd.grad((gA**2).sum(), A)[0]

    zb = deqdiff.fixed_point(f, torch.zeros_like(x), A, x, batch_ndim=1, **opts)
    zs = torch.stack([deqdiff.fixed_point(f, torch.zeros_like(xi), A, xi, **opts) for xi in x])
    assert rel_err(zb, zs) < 1e-10
    assert rel_err(second(zb), second(zs)) < 1e-8
