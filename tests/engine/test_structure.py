"""The default ``batch_ndim=None``: independent samples along dim 0 are found by probing f,
and any coupling between samples keeps the whole state one problem."""

from __future__ import annotations

import pytest
import torch

import deqdiff
from deqdiff.engine.structure import infer_rows
from tests.conftest import contractive_matrix

S, n = 6, 4
_g = torch.Generator().manual_seed(0)
A = contractive_matrix(n, 0.5, _g)
X = torch.randn(S, n, generator=_g)


def per_sample(z, A, x):
    return torch.tanh(z @ A.T + x)


COUPLED = {
    "batch mean": lambda z, A, x: torch.tanh(z @ A.T + x + 0.1 * z.mean(0)),
    "causal": lambda z, A, x: torch.tanh(z @ A.T + x + 0.1 * torch.cumsum(z, 0)),
    "anti-causal": lambda z, A, x: torch.tanh(z @ A.T + x + 0.1 * torch.cumsum(z.flip(0), 0).flip(0)),
    "neighbour": lambda z, A, x: torch.tanh(z @ A.T + x + 0.1 * torch.roll(z, 1, 0)),
    "batch norm": lambda z, A, x: torch.tanh(torch.nn.functional.batch_norm(z @ A.T, None, None, training=True) + x),
    "quadratic at zero": lambda z, A, x: torch.tanh(z @ A.T + x + 0.1 * (z**2).sum(0)),
}


def test_independent_samples_and_their_per_sample_params_are_found():
    assert infer_rows(per_sample, torch.zeros(S, n), (A, X), None, want_batch=True) == (1, (1,))


def test_a_shared_param_whose_dim0_matches_the_batch_is_not_per_sample():
    W = contractive_matrix(S, 0.5, torch.Generator().manual_seed(1))  # S × S, used as a shared matrix
    f = lambda z, W, x: torch.tanh(z @ W[:n, :n].T + x)  # noqa: E731
    assert infer_rows(f, torch.zeros(S, n), (W, X), None, want_batch=True) == (1, (1,))


@pytest.mark.parametrize("transform", ["jvp", "grad", "vjp"])
def test_the_batch_is_found_inside_shape_keeping_transforms(transform):
    """``torch.func.jvp(model, (x,), (ẋ,))`` and friends: the probe sees the plain values."""
    found = []

    def model(x):
        z, info = deqdiff.fixed_point(per_sample, torch.zeros(S, n), A, x, tol=1e-12, return_info=True)
        found.append(info.forward.converged.shape)
        return z

    x, ones = X.clone(), torch.ones_like(X)
    if transform == "jvp":
        _, got = torch.func.jvp(model, (x,), (ones,))
    elif transform == "grad":
        got = torch.func.grad(lambda x: model(x).pow(2).sum())(x)
    else:
        got = torch.func.vjp(model, x)[1](ones)[0]
    assert found == [(S,)]
    flat = lambda xx: per_sample(deqdiff.fixed_point(per_sample, torch.zeros(S * n).reshape(S, n), A, xx,  # noqa: E731
                                                     tol=1e-12, batch_ndim=0), A, xx)
    if transform == "grad":
        x_ = x.clone().requires_grad_()
        (ref,) = torch.autograd.grad(flat(x_).pow(2).sum(), x_)
    else:
        ref = torch.func.jvp(flat, (x,), (ones,))[1] if transform == "jvp" else torch.func.vjp(flat, x)[1](ones)[0]
    assert torch.allclose(got, ref, atol=1e-9)


def test_vmap_keeps_the_conservative_reading():
    found = []

    def model(x):
        z, info = deqdiff.fixed_point(per_sample, torch.zeros(S, n), A, x, tol=1e-12, return_info=True)
        found.append(info.forward.converged.shape)
        return z

    torch.func.vmap(model)(X.expand(2, S, n))
    assert found == [(2,)]  # each vmapped copy is one problem of S·n unknowns


@pytest.mark.parametrize("kind", COUPLED)
def test_coupled_samples_stay_one_problem(kind):
    assert infer_rows(COUPLED[kind], torch.zeros(S, n), (A, X), None, want_batch=True) == (0, None)


@pytest.mark.parametrize("kind", COUPLED)
def test_coupled_default_gradient_matches_dense_reference(kind):
    f = COUPLED[kind]
    x = X.clone().requires_grad_()
    z = deqdiff.fixed_point(f, torch.zeros(S, n), A, x, tol=1e-12, max_iter=500)
    (g,) = torch.autograd.grad(z.pow(2).sum(), x)
    flat = lambda zz, xx: f(zz.reshape(S, n), A, xx.reshape(S, n)).flatten()  # noqa: E731
    Jz = torch.func.jacrev(flat, 0)(z.detach().flatten(), X.flatten())
    Jx = torch.func.jacrev(flat, 1)(z.detach().flatten(), X.flatten())
    w = torch.linalg.solve((torch.eye(S * n) - Jz).T, 2 * z.detach().flatten())
    assert torch.allclose(g.flatten(), Jx.T @ w, atol=1e-9)


def test_default_batch_converges_and_differentiates_per_sample():
    x = X.clone().requires_grad_()
    z, info = deqdiff.fixed_point(per_sample, torch.zeros(S, n), A, x, tol=1e-12, return_info=True)
    assert info.forward.converged.shape == (S,)  # one stopping rule per sample
    z_single = torch.stack([deqdiff.fixed_point(per_sample, torch.zeros(n), A, X[i], tol=1e-12) for i in range(S)])
    assert torch.allclose(z, z_single, atol=1e-12)
    (g,) = torch.autograd.grad(z.sum(), x)
    D = 1 - z.detach() ** 2
    ref = torch.stack([D[i] * torch.linalg.solve((torch.eye(n) - D[i, :, None] * A).T, torch.ones(n)) for i in range(S)])
    assert torch.allclose(g, ref, atol=1e-10)


def test_explicit_batch_ndim_and_row_params_false_are_respected():
    _, info = deqdiff.fixed_point(per_sample, torch.zeros(S, n), A, X, batch_ndim=0, return_info=True)
    assert info.forward.converged.shape == (1,)
    rows_seen = []

    def counting(z, A, x):
        rows_seen.append(z.shape[0])
        return per_sample(z, A, x)

    deqdiff.fixed_point(counting, torch.zeros(S, n), A, X, row_params=False, solver="fixed_point", tol=1e-10)
    assert set(rows_seen) == {S}  # no row subsets


def test_integer_per_sample_param_disables_row_subsets():
    idx = torch.arange(S)
    f = lambda z, A, x, i: torch.tanh(z @ A.T + x[i])  # noqa: E731
    assert infer_rows(f, torch.zeros(S, n), (A, X, idx), None, want_batch=True) == (1, None)
